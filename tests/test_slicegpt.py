import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import llmdeploy
from llmdeploy.compress.engine import run_blockwise
from llmdeploy.errors import ConfigError, UnsupportedArchitectureError
from llmdeploy.finetune import LoRAFinetune
from llmdeploy.models import get_adapter
from llmdeploy.models.tokenizer import byte_level_tokenizer
from llmdeploy.prune import SliceGPT, sliced_width
from llmdeploy.prune.sliced_modeling import RMSN
from llmdeploy.quant import RTN

from .conftest import ids_for


class ExactRMSNorm(nn.Module):
    """transformers' RMSNorms compute in float32 even for float64 inputs; this one computes in the
    input's dtype, so that float64 comparisons are tight (same weight and epsilon)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def exact_norms(model: nn.Module) -> nn.Module:
    for name, mod in list(model.named_modules()):
        if type(mod).__name__.endswith("RMSNorm"):
            model.set_submodule(name, ExactRMSNorm(mod))
    return model


def tiny(model_type: str, dtype=torch.float64, **overrides):
    """A seeded random model of each supported family (norm scales and biases randomised, so that
    fusing them is actually exercised)."""
    if model_type in ("llama", "opt", "qwen2"):
        model, tok = llmdeploy.load(f"tiny-{model_type}", dtype=dtype)
    else:
        tok = byte_level_tokenizer()
        cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=16, max_position_embeddings=256, initializer_range=0.1,
                                   tie_word_embeddings=True, **overrides)
        torch.manual_seed(3)
        model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # LayerNorm / RMSNorm scales and shifts
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
    return model, tok


ALL_FAMILIES = ["llama", "opt", "qwen2", "mistral", "qwen3"]


def calib_for(tok, n=8, seq=32, seed=0):
    return ids_for(tok, n=n, seq=seq, seed=seed)


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("orientation", ["pca", "random"])
def test_rotation_alone_is_exact(family, orientation):
    """Computational invariance: fused norms + PCA rotations, nothing sliced: same logits."""
    model, tok = tiny(family)
    exact_norms(model)
    ids = ids_for(tok, n=2, seq=24, seed=5)
    with torch.no_grad():
        ref = model(ids).logits
    rotated = SliceGPT(sparsity=0.0, final_orientation=orientation, batch_size=4)(copy.deepcopy(model),
                                                                                   calib_for(tok))
    assert type(rotated).__name__.startswith("Sliced")
    assert all(isinstance(m, RMSN) for n, m in rotated.named_modules() if "norm" in n.split(".")[-1]
               and "q_norm" not in n and "k_norm" not in n)
    with torch.no_grad():
        out = rotated(ids).logits
    assert torch.allclose(out, ref, rtol=0, atol=1e-10 * ref.abs().max().item()), (out - ref).abs().max()
    # and it really rotated: the first block's query weights changed
    q0 = get_adapter(rotated).block_linears(get_adapter(rotated).blocks()[0])["self_attn.q_proj"]
    q_ref = get_adapter(model).block_linears(get_adapter(model).blocks()[0])["self_attn.q_proj"]
    assert not torch.allclose(q0.weight, q_ref.weight)


def test_sliced_width_rounding():
    assert sliced_width(576, 0.10, 8) == 512  # int(518.4) = 518 -> 512
    assert sliced_width(576, 0.20, 8) == 456
    assert sliced_width(576, 0.25, 8) == 432
    assert sliced_width(576, 0.30, 8) == 400
    assert sliced_width(4096, 0.25, 128) == 3072
    assert sliced_width(64, 0.0, 8) == 64


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2"])
@pytest.mark.parametrize("slice_head", [False, True])
def test_slicing_removes_exactly_the_expected_dimensions(family, slice_head):
    model, tok = tiny(family, dtype=torch.float32)
    d = model.config.hidden_size
    dense_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    sg = SliceGPT(sparsity=0.3, round_to=8, slice_head=slice_head, batch_size=4)
    sliced = sg(copy.deepcopy(model), calib_for(tok))
    k = sliced_width(d, 0.3, 8)
    assert k == 40
    adapter = get_adapter(sliced)
    blocks = adapter.blocks()
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        d_out = d if last and not slice_head else k
        lin = adapter.block_linears(block)
        for path, m in lin.items():
            role = next(s.role for s in adapter.linear_specs if s.path == path)
            if role in ("attn_in", "mlp_in"):
                assert m.in_features == k and m.weight.shape[1] == k
            elif role == "attn_out":
                assert m.out_features == k and m.weight.shape[0] == k
            else:
                assert m.weight.shape[0] == d_out
            # the inner widths (heads, MLP) are untouched
            dense_lin = get_adapter(model).block_linears(get_adapter(model).blocks()[i])[path]
            if role in ("attn_in", "mlp_in"):
                assert m.out_features == dense_lin.out_features
            else:
                assert m.in_features == dense_lin.in_features
        assert block.attn_shortcut_Q.shape == (k, k)
        assert block.mlp_shortcut_Q.shape == (k, d_out)
    for path in adapter.residual_embedding_paths:
        assert sliced.get_submodule(path).weight.shape[1] == k
    assert adapter.head().in_features == (k if slice_head else d)
    assert adapter.head().weight is not sliced.get_submodule(adapter.residual_embedding_paths[0]).weight
    # the real parameter count: shortcuts and the untied head included, reported as such
    params = sum(p.numel() for p in {id(p): p for p in sliced.parameters()}.values())
    assert sg.report_.params_sliced == params and sg.report_.params_dense == dense_params
    assert sg.report_.shortcut_params == sum(b.attn_shortcut_Q.numel() + b.mlp_shortcut_Q.numel()
                                                 for b in blocks)
    assert sg.report_.nominal_sparsity == pytest.approx(1 - 40 / 64)
    assert "shortcuts" in sg.summary()
    ids = ids_for(tok, n=2, seq=32, seed=9)
    loss = sliced(ids, labels=ids).loss
    assert torch.isfinite(loss) and torch.exp(loss) < 10 * len(tok)


def _recompute_block(block, x, kwargs, adapter):
    """A sliced block's output computed directly from its weights."""
    lay = adapter.rotation_layout()
    d = block.get_submodule(lay["attn_norm"]).mean_dim
    eps = block.get_submodule(lay["attn_norm"]).eps

    def rmsn(v):
        return v / torch.sqrt(v.pow(2).sum(-1, keepdim=True) / d + eps)

    attn = block.get_submodule(lay["attn"])(hidden_states=rmsn(x), **kwargs)[0]
    h = x @ block.attn_shortcut_Q + attn
    u = rmsn(h)
    mlp = adapter.mlp_parts(block)
    inner = mlp.act(u @ mlp.up.weight.T + (0 if mlp.up.bias is None else mlp.up.bias))
    if mlp.gated:
        inner = mlp.act(u @ mlp.gate.weight.T) * (u @ mlp.up.weight.T)
    out = inner @ mlp.down.weight.T + (0 if mlp.down.bias is None else mlp.down.bias)
    return h @ block.mlp_shortcut_Q + out


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_sliced_layers_match_a_direct_recomputation(family):
    model, tok = tiny(family)
    sliced = SliceGPT(sparsity=0.25, batch_size=4)(copy.deepcopy(model), calib_for(tok))
    adapter = get_adapter(sliced)
    ids = ids_for(tok, n=2, seq=20, seed=11)

    def process(ctx):
        out = ctx.forward()
        for x, kw, y in zip(ctx.inputs, ctx.kwargs, out):
            with torch.no_grad():
                direct = _recompute_block(ctx.block, x, kw, adapter)
            assert torch.allclose(direct, y, atol=1e-10), (direct - y).abs().max()
        process.checked += 1

    process.checked = 0
    run_blockwise(sliced, ids, process, batch_size=1)
    assert process.checked == len(adapter.blocks())


def test_pca_rotation_diagonalises_the_first_block_input():
    """Block 0's (sliced) input on the calibration data has a diagonal second moment with
    decreasing entries: the kept coordinates are the leading principal components."""
    model, tok = tiny("llama")
    calib = calib_for(tok, n=6, seq=40)
    sliced = SliceGPT(sparsity=0.25, batch_size=3)(copy.deepcopy(model), calib)
    rec = []
    run_blockwise(sliced, calib, None, batch_size=3, record_inputs=rec)
    x = rec[0].reshape(-1, rec[0].shape[-1])
    m = x.T @ x
    off = m - torch.diag(torch.diagonal(m))
    assert off.abs().max() < 1e-8 * m.abs().max()
    diag = torch.diagonal(m)
    assert (diag[:-1] >= diag[1:] - 1e-9 * diag[0]).all()


def test_random_orientation_is_the_same_function_as_pca():
    """A rotation inside each kept subspace changes weights, not the sliced model's function."""
    model, tok = tiny("qwen2")
    calib = calib_for(tok)
    a = SliceGPT(sparsity=0.25, batch_size=4)(copy.deepcopy(model), calib)
    b = SliceGPT(sparsity=0.25, final_orientation="random", seed=1, batch_size=4)(copy.deepcopy(model), calib)
    ids = ids_for(tok, n=2, seq=16, seed=3)
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert torch.allclose(la, lb, atol=1e-8 * la.abs().max().item())
    assert not torch.allclose(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_more_slicing_loses_more():
    model, tok = tiny("llama", dtype=torch.float32)
    calib = calib_for(tok, n=8, seq=48)
    ids = ids_for(tok, n=4, seq=48, seed=1)
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits, -1)
    errs = []
    for s in (0.1, 0.3, 0.6):
        sliced = SliceGPT(sparsity=s, batch_size=4)(copy.deepcopy(model), calib)
        with torch.no_grad():
            out = torch.log_softmax(sliced(ids).logits, -1)
        errs.append((out.exp() * (out - ref)).sum(-1).mean().item())  # KL(sliced || dense)
    assert errs[0] < errs[1] < errs[2]


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2"])
def test_save_load_both_ways(family, tmp_path):
    model, tok = tiny(family, dtype=torch.float32)
    sliced = SliceGPT(sparsity=0.25, batch_size=4)(copy.deepcopy(model), calib_for(tok))
    ids = ids_for(tok, n=2, seq=24, seed=4)
    with torch.no_grad():
        ref = sliced(ids).logits
    out = llmdeploy.save(sliced, tok, tmp_path / "sliced")
    loaded, _ = llmdeploy.load(out)
    assert type(loaded) is type(sliced)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_slicegpt.Sliced")
    assert (out / "modeling_slicegpt.py").exists()
    # transformers alone, llmdeploy made unimportable
    torch.save({"ids": ids, "ref": ref}, tmp_path / "ref.pt")
    code = (
        "import sys; sys.modules['llmdeploy'] = None\n"
        "import torch\nfrom transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        f"r = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n    o = m(r['ids']).logits\n"
        "assert type(m).__name__.startswith('Sliced'), type(m)\n"
        "print('MAXDIFF', (o - r['ref']).abs().max().item())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "MAXDIFF 0.0" in res.stdout, res.stdout


def test_generate_with_kv_cache_matches_full_recompute():
    model, tok = tiny("llama", dtype=torch.float32)
    sliced = SliceGPT(sparsity=0.25, batch_size=4)(copy.deepcopy(model), calib_for(tok))
    ids = ids_for(tok, n=1, seq=10, seed=2)
    with torch.no_grad():
        gen = sliced.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True,
                              pad_token_id=tok.pad_token_id)
        nocache = sliced.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False,
                                  pad_token_id=tok.pad_token_id)
    assert torch.equal(gen, nocache)


def test_compose_with_quantization_and_round_trip(tmp_path):
    model, tok = tiny("llama", dtype=torch.float32)
    recipe = llmdeploy.Compose([SliceGPT(sparsity=0.25, batch_size=4), RTN(bits=4, group_size=16)])
    out_model = recipe(copy.deepcopy(model), calib_for(tok))
    ids = ids_for(tok, n=2, seq=16)
    with torch.no_grad():
        ref = out_model(ids).logits
    loaded, _ = llmdeploy.load(llmdeploy.save(out_model, tok, tmp_path / "sq"))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    assert [e["method"] for e in llmdeploy.applied_recipe(loaded)] == ["slicegpt", "rtn"]


def test_lora_recovery_finetuning_lowers_the_loss_and_merges(tmp_path):
    model, tok = tiny("llama", dtype=torch.float32)
    calib = calib_for(tok, n=8, seq=32)
    sliced = SliceGPT(sparsity=0.3, batch_size=4)(copy.deepcopy(model), calib)
    shapes = {n: p.shape for n, p in sliced.named_parameters()}
    sliced.model.layers[0].attn_shortcut_Q.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in sliced.named_parameters()}
    with torch.no_grad():
        before = sliced(calib, labels=calib).loss.item()
    ft = LoRAFinetune(rank=4, alpha=8, epochs=6, batch_size=2, lr=5e-3, dropout=0.0)
    tuned = ft(sliced, calib)
    with torch.no_grad():
        after = tuned(calib, labels=calib).loss.item()
    assert after < before - 0.05
    assert len(ft.report_.history) == 24 and "LoRA" in ft.summary()
    assert ft.report_.probe_loss[1] < ft.report_.probe_loss[0]
    assert ft.report_.merged == 3 * 7 and ft.report_.kept == 0
    # merged: the same parameters and shapes, no adapter left behind
    assert {n: p.shape for n, p in tuned.named_parameters()} == shapes
    assert not any("lora" in n for n, _ in tuned.named_modules())
    assert {n: p.requires_grad for n, p in tuned.named_parameters()} == flags
    loaded, _ = llmdeploy.load(llmdeploy.save(tuned, tok, tmp_path / "rft"))
    with torch.no_grad():
        assert torch.equal(loaded(calib[:2]).logits, tuned(calib[:2]).logits)
    assert [e["method"] for e in llmdeploy.applied_recipe(loaded)] == ["slicegpt", "lora_finetune"]


def test_lora_max_steps_and_errors():
    model, tok = tiny("opt", dtype=torch.float32)
    calib = calib_for(tok, n=4, seq=16)
    ft = LoRAFinetune(rank=2, epochs=10, batch_size=2, max_steps=3)
    ft(copy.deepcopy(model), calib)
    assert len(ft.report_.history) == 3
    with pytest.raises(ConfigError, match="rank"):
        LoRAFinetune(rank=0)(copy.deepcopy(model), calib)


def test_lora_on_a_quantized_model_keeps_adapters_beside_the_codes(tmp_path):
    """QLoRA-style: the RTN codes stay as they are, the adapters train beside them, and the result
    saves, loads and counts its bits; a second LoRA pass has nothing left to adapt."""
    model, tok = tiny("opt", dtype=torch.float32)
    calib = calib_for(tok, n=8, seq=32)
    q = RTN(bits=4, group_size=16)(copy.deepcopy(model))
    codes = q.model.decoder.layers[0].fc1.qweight.clone()
    fp_q = llmdeploy.eval.footprint(q)
    with torch.no_grad():
        before = q(calib, labels=calib).loss.item()
    ft = LoRAFinetune(rank=4, alpha=8, epochs=4, batch_size=2, lr=5e-3, dropout=0.0)
    tuned = ft(q, calib)
    with torch.no_grad():
        after = tuned(calib, labels=calib).loss.item()
    assert after < before - 0.02
    lin = tuned.model.decoder.layers[0].fc1
    assert type(lin).__name__ == "LoRALinear" and torch.equal(lin.base.qweight, codes)
    assert ft.report_.kept == 3 * 6 and ft.report_.merged == 0
    fp = llmdeploy.eval.footprint(tuned)
    assert fp.compressed_params == fp_q.compressed_params
    adapters = sum(m.lora_A.numel() + m.lora_B.numel() for m in tuned.modules() if type(m).__name__ == "LoRALinear")
    assert fp.compressed_bytes == fp_q.compressed_bytes + 4 * adapters  # the fp32 adapters are counted
    loaded, _ = llmdeploy.load(llmdeploy.save(tuned, tok, tmp_path / "qlora"))
    with torch.no_grad():
        assert torch.equal(loaded(calib[:2]).logits, tuned(calib[:2]).logits)
    with pytest.raises(ConfigError, match="already carry LoRA"):
        LoRAFinetune(max_steps=1)(loaded, calib)


def test_errors_are_clear():
    model, tok = tiny("llama", dtype=torch.float32)
    calib = calib_for(tok)
    with pytest.raises(ConfigError, match="sparsity"):
        SliceGPT(sparsity=1.0)(copy.deepcopy(model), calib)
    with pytest.raises(ConfigError, match="final_orientation"):
        SliceGPT(final_orientation="svd")(copy.deepcopy(model), calib)
    with pytest.raises(ConfigError, match="leaves no dimension"):
        SliceGPT(sparsity=0.9, round_to=16)(copy.deepcopy(model), calib)
    sliced = SliceGPT(sparsity=0.25, batch_size=4)(copy.deepcopy(model), calib)
    with pytest.raises(ConfigError, match="already sliced"):
        SliceGPT(sparsity=0.1)(sliced, calib)
    with pytest.raises(ConfigError, match="before quantizing"):
        SliceGPT()(RTN(bits=4, group_size=16)(copy.deepcopy(model)), calib)
    post_norm, _ = tiny("opt", dtype=torch.float32)
    post_norm.config.do_layer_norm_before = False
    with pytest.raises(UnsupportedArchitectureError, match="post-norm"):
        SliceGPT()(post_norm, calib)


def test_lora_divergence_leaves_the_model_as_it_was():
    from llmdeploy.errors import TrainingDivergedError

    model, tok = tiny("llama", dtype=torch.float32)
    calib = calib_for(tok, n=4, seq=16)
    q = RTN(bits=4, group_size=16)(copy.deepcopy(model))
    types_before = {n: type(m) for n, m in q.named_modules()}
    with torch.no_grad():
        ref = q(calib[:1]).logits
    with pytest.raises(TrainingDivergedError, match="lower lr"):
        LoRAFinetune(rank=2, lr=1e30, max_steps=4, batch_size=2, dropout=0.0)(q, calib)
    assert {n: type(m) for n, m in q.named_modules()} == types_before
    with torch.no_grad():
        assert torch.equal(q(calib[:1]).logits, ref)
