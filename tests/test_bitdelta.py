"""BitDelta: sign packing, the binary matmul kernel, scale distillation, delta files, multi-tenant batches."""

import copy

import pytest
import torch
import torch.nn.functional as F

import llmdeploy
from llmdeploy.delta import BitDelta, BitDeltaLinear, MultiTenant, load_delta, save_delta
from llmdeploy.errors import CheckpointError, ConfigError
from llmdeploy.kernels import native
from llmdeploy.kernels.binary import (
    multi_binary_matmul,
    multi_binary_matmul_reference,
    pack_signs,
    unpack_signs,
)

from .conftest import ids_for


@pytest.mark.parametrize("shape", [(5, 8), (7, 13), (64, 160), (3, 1)])
def test_sign_packing_round_trip(shape):
    x = torch.randn(*shape)
    x[0, 0] = 0.0  # zero counts as +1
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], -(-shape[1] // 8))
    expect = torch.where(x >= 0, 1.0, -1.0)
    assert torch.equal(unpack_signs(packed, shape[1]), expect)


@pytest.mark.parametrize("rows", [1, 4, 20])
@pytest.mark.parametrize("in_f,out_f", [(13, 7), (64, 160), (200, 33)])
def test_multi_binary_matmul_equals_reference(rows, in_f, out_f):
    g = torch.Generator().manual_seed(rows * 1000 + in_f)
    packed = torch.stack([pack_signs(torch.randn(out_f, in_f, generator=g)) for _ in range(3)])
    x = torch.randn(in_f, rows, generator=g).T  # non-contiguous
    tenant = torch.randint(0, 3, (rows,), generator=g)
    got = multi_binary_matmul(x, packed, tenant, in_f)
    ref = multi_binary_matmul_reference(x.contiguous(), packed, tenant, in_f)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    dense = torch.stack([x[n] @ unpack_signs(packed[tenant[n]], in_f).T for n in range(rows)])
    torch.testing.assert_close(got, dense, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("isa", native.available_isas())  # every SIMD path this CPU runs
@pytest.mark.parametrize("rows", [1, 7, 40])
@pytest.mark.parametrize("in_f,out_f", [(13, 7), (64, 160), (200, 33), (576, 48)])
def test_native_binary_matmul_equals_reference(isa, rows, in_f, out_f):
    with native.isa(isa):
        _check_native_binary(rows, in_f, out_f)


def _check_native_binary(rows, in_f, out_f):
    from llmdeploy.kernels.binary import merge_signs, multi_binary_matmul_native, native_available
    if not native_available():
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(rows * 7 + in_f)
    w = torch.randn(out_f, in_f, generator=g)
    signs = pack_signs(torch.randn(out_f, in_f, generator=g))
    assert torch.equal(merge_signs(w, signs, 0.25), w + 0.25 * unpack_signs(signs, in_f))
    packed = torch.stack([pack_signs(torch.randn(out_f, in_f, generator=g)) for _ in range(3)])
    x = torch.randn(in_f, rows, generator=g).T  # non-contiguous
    tenant = torch.randint(0, 3, (rows,), generator=g)
    got = multi_binary_matmul_native(x, packed, tenant, in_f)
    torch.testing.assert_close(got, multi_binary_matmul_reference(x.contiguous(), packed, tenant, in_f),
                               atol=1e-4, rtol=1e-5)
    with pytest.raises(IndexError, match="tenant indices"):
        multi_binary_matmul_native(x, packed, torch.full((rows,), 3), in_f)


def test_native_kernel_falls_back_without_a_compiler(monkeypatch, tmp_path):
    from llmdeploy.kernels import native
    monkeypatch.setenv("LLMDEPLOY_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")  # a "compiler" that always fails
    native.library.cache_clear()
    try:
        assert native.library("binary") is None
        assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-built left behind
        monkeypatch.setenv("LLMDEPLOY_NATIVE", "0")
        native.library.cache_clear()
        assert native.library("binary") is None
    finally:
        native.library.cache_clear()


def _pair():
    base, tok = llmdeploy.load("tiny-llama")
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, m in ft.named_modules():
            if isinstance(m, torch.nn.Linear) and "layers" in name:
                m.weight += 0.02 * torch.randn(m.weight.shape, generator=g) * (1 + torch.rand(m.weight.shape[0], 1, generator=g))
    return base.eval(), ft.eval(), tok


def test_module_equals_explicit_dense_weight():
    base, ft, _ = _pair()
    name = "model.layers.1.mlp.down_proj"
    mod = BitDeltaLinear.from_weights(base.get_submodule(name), ft.get_submodule(name).weight)
    delta = ft.get_submodule(name).weight - base.get_submodule(name).weight
    assert mod.scale.item() == pytest.approx(delta.abs().mean().item(), rel=1e-5)
    dense = base.get_submodule(name).weight + mod.scale * torch.where(delta >= 0, 1.0, -1.0)
    for x in (torch.randn(1, 160), torch.randn(2, 5, 160)):
        with torch.no_grad():
            torch.testing.assert_close(mod(x), F.linear(x, dense), atol=1e-5, rtol=1e-5)
    assert mod.base is base.get_submodule(name)  # shared, not copied
    assert set(dict(mod.named_parameters())) == {"scale"}


def test_distillation_fast_path_equals_autograd_through_the_dense_weight():
    """The fused training matmul (unpacked signs, merged-weight backward) gives the same output and
    gradients for the input and the scale as autograd through ``W_base + α·S``."""
    base, ft, _ = _pair()
    name = "model.layers.0.mlp.up_proj"
    mod = BitDeltaLinear.from_weights(base.get_submodule(name), ft.get_submodule(name).weight)
    base.requires_grad_(False)
    mod.scale.requires_grad_(True)
    mod._dense_signs = unpack_signs(mod.signs, mod.in_features)
    x = torch.randn(2, 5, mod.in_features, requires_grad=True)
    g = torch.randn(2, 5, mod.out_features)
    (mod(x) * g).sum().backward()
    got = (x.grad.clone(), mod.scale.grad.clone())
    x.grad, mod.scale.grad = None, None
    dense = mod.base.weight + mod.scale * mod._dense_signs
    (F.linear(x, dense, mod.base.bias) * g).sum().backward()
    torch.testing.assert_close(got[0], x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], mod.scale.grad, atol=1e-4, rtol=1e-5)
    assert mod.scale.grad.abs() > 0


def test_scale_distillation_trains_only_the_scales():
    base, ft, tok = _pair()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    ft_state = {k: v.clone() for k, v in ft.state_dict().items()}
    calib = ids_for(tok, n=8, seq=32)
    bd = BitDelta(base=base, steps=30, lr=2e-3, batch_size=4)
    model = bd(ft, calib)
    r = bd.report_
    assert r.final_loss < r.init_loss and r.layers == 21
    assert r.fp16_bytes / r.delta_bytes > 10
    for k, v in base.state_dict().items():
        assert torch.equal(v, base_state[k]), k  # the base is untouched
    for k, v in ft.state_dict().items():
        assert torch.equal(v, ft_state[k]), k  # so is the fine-tune
    mods = {n: m for n, m in model.named_modules() if isinstance(m, BitDeltaLinear)}
    init = BitDelta(base=base).compress(ft)
    moved = 0
    for n, m in mods.items():
        assert torch.equal(m.signs, init.get_submodule(n).signs)
        moved += m.scale.item() != init.get_submodule(n).scale.item()
    assert moved == len(mods)
    # every tensor that is not a scale is the base's own tensor
    for n, p in model.named_parameters():
        if not n.endswith(".scale"):
            assert p is base.get_parameter(n)
    assert not any(m.scale.requires_grad for m in mods.values())


def test_delta_file_round_trip_and_base_check(tmp_path):
    base, ft, tok = _pair()
    model = BitDelta(base=base, steps=3, lr=1e-3)(ft, ids_for(tok, n=4, seq=16))
    path = save_delta(model, tmp_path / "d.safetensors", base)
    size = path.stat().st_size
    assert size < sum(m.weight.numel() for n, m in ft.named_modules() if isinstance(m, torch.nn.Linear)) / 4
    again = load_delta(base, path)
    ids = ids_for(tok, n=2, seq=12)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    other, _ = llmdeploy.load("tiny-llama")
    with torch.no_grad():
        other.model.norm.weight += 1e-3
    with pytest.raises(CheckpointError, match="another base model"):
        load_delta(other, path)


def test_multi_tenant_batch_equals_each_model_alone():
    base, ft, tok = _pair()
    ft2 = copy.deepcopy(ft)
    with torch.no_grad():
        for m in ft2.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(-1.0)  # a very different fine-tune
    calib = ids_for(tok, n=4, seq=16)
    tenants = {"a": BitDelta(base=base, steps=2, lr=1e-3)(ft, calib),
               "b": BitDelta(base=base, steps=2, lr=1e-3)(ft2, calib)}
    server = MultiTenant(base, tenants)
    ids = ids_for(tok, n=5, seq=10, seed=3)
    rows = ["a", "b", "b", "a", "b"]
    with torch.no_grad():
        logits = server(ids, rows).logits
        for i, t in enumerate(rows):
            torch.testing.assert_close(logits[i], tenants[t](ids[i:i + 1]).logits[0], atol=1e-4, rtol=1e-4)
        out = server.generate(ids, rows, max_new_tokens=6, do_sample=False, pad_token_id=0)
        for i, t in enumerate(rows):
            alone = tenants[t].generate(ids[i:i + 1], max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert torch.equal(out[i], alone[0])
    assert server.delta_bytes() < sum(p.numel() for p in base.parameters())  # 2 tenants << one fp32 base
    with pytest.raises(ConfigError, match="unknown tenant"):
        server(ids, ["a", "b", "c", "a", "a"])


def test_bitdelta_errors():
    base, ft, tok = _pair()
    with pytest.raises(ConfigError, match="base="):
        BitDelta()(ft, ids_for(tok))
    other, _ = llmdeploy.load("tiny-qwen2")
    with pytest.raises(ConfigError, match="different decoder linears|dense linear"):
        BitDelta(base=other)(ft, ids_for(tok))


@pytest.mark.parametrize("rows,in_f,out_f", [(1, 13, 7), (4, 64, 160), (3, 200, 33)])
def test_triton_multi_binary_matmul_equals_reference(rows, in_f, out_f):
    from llmdeploy.kernels import binary_triton
    if not binary_triton.available():
        pytest.skip("triton not installed")
    g = torch.Generator().manual_seed(rows + in_f)
    packed = torch.stack([pack_signs(torch.randn(out_f, in_f, generator=g)) for _ in range(3)])
    x = torch.randn(rows, in_f, generator=g)
    tenant = torch.randint(0, 3, (rows,), generator=g)
    got = binary_triton.multi_binary_matmul(x, packed, tenant, in_f, block_o=16, block_b=4)
    torch.testing.assert_close(got, multi_binary_matmul_reference(x, packed, tenant, in_f), atol=1e-4, rtol=1e-5)


def test_baselines_fit_the_budget_and_reconstruct():
    from llmdeploy.delta import LowRankDelta, RTNDelta
    base, ft, tok = _pair()
    bd = BitDelta(base=base, steps=0)
    bd(ft, ids_for(tok, n=4, seq=8))
    lr = LowRankDelta(base=base)
    lr_model = lr(ft, None)
    assert lr.report_.delta_bytes <= bd.report_.delta_bytes
    full = LowRankDelta(base=base, rank=64)(ft, None)  # full rank on 64-wide layers: exact up to fp16
    name = "model.layers.0.self_attn.q_proj"
    delta = ft.get_submodule(name).weight - base.get_submodule(name).weight
    torch.testing.assert_close(full.get_submodule(name).delta, delta, atol=2e-3, rtol=0)
    assert (lr_model.get_submodule(name).delta - delta).norm() < delta.norm()
    rtn = RTNDelta(base=base, bits=8, group_size=32)(ft, None)
    assert (rtn.get_submodule(name).delta - delta).abs().max() < delta.abs().max() / 100
    ids = ids_for(tok, n=1, seq=6)
    with torch.no_grad():  # the base outside the linears, the approximate delta inside
        assert rtn(ids).logits.shape == ft(ids).logits.shape


def test_multi_binary_linear_prefill_path_equals_decode_path():
    """Above NATIVE_MAX_ROWS rows the per-tenant merged weight is used; it equals base + per-row delta."""
    from llmdeploy.kernels.binary import NATIVE_MAX_ROWS, merge_signs, multi_binary_linear
    g = torch.Generator().manual_seed(3)
    base = torch.nn.Linear(40, 24)
    packed = torch.stack([pack_signs(torch.randn(24, 40, generator=g)) for _ in range(3)])
    scales = torch.tensor([0.01, 0.02, 0.03])
    x = torch.randn(NATIVE_MAX_ROWS + 9, 40, generator=g)
    tenant = torch.randint(0, 3, (x.shape[0],), generator=g)
    with torch.no_grad():
        got = multi_binary_linear(x, base, packed, scales, tenant)
        ref = base(x) + scales[tenant][:, None] * multi_binary_matmul_reference(x, packed, tenant, 40)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merge_signs(base.weight, packed[1], 0.02),
                                   base.weight + 0.02 * unpack_signs(packed[1], 40))


def test_readme_quotes_the_bitdelta_benchmark():
    """The README's BitDelta numbers are those of benchmarks/results/bitdelta/bitdelta.json."""
    import json
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    res = json.loads((root / "benchmarks" / "results" / "bitdelta" / "bitdelta.json").read_text())
    readme = " ".join((root / "README.md").read_text().split())

    def gain(domain, label, corpus):
        rows = res["domains"][domain]
        ft, ppl, base = rows["fine-tune (dense)"]["ppl"][corpus], rows[label]["ppl"][corpus], res["base"][corpus]
        return f"{100 * (base - ppl) / (base - ft):.1f}%"

    done = {d: rows for d, rows in res["domains"].items()
            if "BitDelta, scales distilled" in rows and "low-rank delta (SVD), same bytes" in rows}
    assert "shakespeare" in done
    for domain, rows in done.items():
        for corpus in rows["BitDelta, scales distilled"]["ppl"]:
            quoted = (f"{domain} on {corpus}: {gain(domain, 'BitDelta, scales distilled', corpus)} "
                      f"(scales at init {gain(domain, 'BitDelta, scales at init', corpus)}, "
                      f"SVD {gain(domain, 'low-rank delta (SVD), same bytes', corpus)})")
            assert quoted in readme, quoted
    emb_d, emb_i = ("BitDelta + embedding delta (per-row scales), distilled",
                    "BitDelta + embedding delta (per-row scales), at init")
    for domain, rows in res["domains"].items():
        for corpus in rows.get(emb_d, {}).get("ppl", {}):
            quoted = f"{domain} on {corpus}: {gain(domain, emb_d, corpus)} (at init {gain(domain, emb_i, corpus)})"
            assert quoted in readme, quoted
    emb = res["domains"]["shakespeare"][emb_d]
    assert f"{emb['delta_bytes'] / 2**20:.2f} MiB, {emb['fp16_bytes'] / emb['delta_bytes']:.1f}x smaller" in readme
    delta = res["domains"]["shakespeare"]["BitDelta, scales distilled"]["delta_bytes"]
    assert f"{delta / 2**20:.2f} MiB" in readme and f"{res['fp16_linear_bytes'] / delta:.1f}x smaller" in readme
    sv = res["serve"]
    assert all(sv["rows_equal_each_tenant_alone"])
    mt = sv["median_s"]["MultiTenant (one base, per-row deltas) generate"]
    dense = sv["median_s"]["dense fine-tunes one after another generate"]
    assert f"{sv['tokens'] / mt:.1f} tokens/s against {sv['tokens'] / dense:.1f}" in readme


def test_others_finetune_keeps_the_finetunes_own_tensors(tmp_path):
    """others='finetune' (the reference's model): the fine-tune's norms/embeddings where they differ
    from the base, in 16 bits, stored in the delta; ties stay tied; MultiTenant refuses it."""
    base, ft, tok = _pair()
    with torch.no_grad():  # the fine-tune also moved a norm and the embedding
        ft.model.norm.weight.add_(0.05)
        ft.model.embed_tokens.weight.add_(0.01 * torch.randn(ft.model.embed_tokens.weight.shape))
    bd = BitDelta(base=base, others="finetune")
    model = bd.compress(ft)
    assert torch.equal(model.model.norm.weight, ft.model.norm.weight.half().float())
    assert model.model.embed_tokens.weight is model.get_output_embeddings().weight or \
        not base.config.tie_word_embeddings
    assert torch.equal(base.model.norm.weight, _pair()[0].model.norm.weight)  # the base is untouched
    plain_bd = BitDelta(base=base)
    plain = plain_bd.compress(ft)
    extra = 2 * (ft.model.norm.weight.numel() + ft.model.embed_tokens.weight.numel())  # fp16
    assert bd.report_.delta_bytes == plain_bd.report_.delta_bytes + extra
    ids = ids_for(tok, 2, 12)
    ref = copy.deepcopy(ft)  # the explicit model: fine-tune's tensors in fp16, linears W_base + α·sign(Δ)
    with torch.no_grad():
        base_params = dict(base.named_parameters())
        for n, p in ref.named_parameters():
            if not torch.equal(p, base_params[n]):
                p.copy_(p.half().float())
        for name, m in model.named_modules():
            if isinstance(m, BitDeltaLinear):
                ref.get_submodule(name).weight.copy_(m.base.weight + m.delta_weight())
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(plain(ids).logits, ref(ids).logits, atol=1e-4)  # others='base' differs
    path = save_delta(model, tmp_path / "own.safetensors", base)
    back = load_delta(base, path)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="others='base'"):
        MultiTenant(base, {"own": back, "plain": plain})


def _pair_with_embedding(name: str):
    """A base and a fine-tune that moved its decoder linears and, unevenly by row, its embedding
    (and its head where untied)."""
    base, tok = llmdeploy.load(name)
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, m in ft.named_modules():
            if isinstance(m, torch.nn.Linear) and "layers" in n:
                m.weight += 0.02 * torch.randn(m.weight.shape, generator=g)
        for w in {id(p): p for p in (ft.get_input_embeddings().weight, ft.get_output_embeddings().weight)}.values():
            w += 0.05 * torch.rand(w.shape[0], 1, generator=g) ** 3 * torch.randn(w.shape, generator=g)
    return base.eval(), ft.eval(), tok


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])  # untied and tied head
def test_embedding_delta_equals_explicit_dense_model(name):
    from llmdeploy.delta import BitDeltaEmbedding
    base, ft, tok = _pair_with_embedding(name)
    tied = base.get_output_embeddings().weight is base.get_input_embeddings().weight
    plain_bd, bd = BitDelta(base=base), BitDelta(base=base, embeddings=True)
    plain_bd.compress(ft)
    model = bd.compress(ft)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, BitDeltaEmbedding) and isinstance(head, BitDeltaLinear) and head.per_row
    delta = ft.get_input_embeddings().weight - base.get_input_embeddings().weight
    torch.testing.assert_close(emb.scale, delta.abs().mean(1))  # one scale per row, mean|Δ_r|
    assert (head.scale is emb.scale and head.signs is emb.signs) == tied
    vocab, dim = delta.shape
    extra = (vocab * dim // 8 + 2 * vocab) * (1 if tied else 2)
    assert bd.report_.delta_bytes == plain_bd.report_.delta_bytes + extra
    ref = copy.deepcopy(base)  # the explicit model: every delta merged into a dense weight
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, (BitDeltaLinear, BitDeltaEmbedding)):
                ref.get_submodule(n).weight.copy_(m.base.weight + m.delta_weight())
        ids = ids_for(tok, 2, 12)
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
        # the embedding delta brings the model closer to the fine-tune than the linears alone
        plain = plain_bd.compress(ft)
        err = (model(ids).logits - ft(ids).logits).norm()
        assert err < (plain(ids).logits - ft(ids).logits).norm()
    with pytest.raises(ConfigError, match="choose one"):
        BitDelta(base=base, embeddings=True, others="finetune")(ft, ids_for(tok))


def test_per_row_scale_distill_matmul_gradients():
    from llmdeploy.delta.bitdelta import _DistillMatmul
    g = torch.Generator().manual_seed(5)
    w, signs = torch.randn(12, 8, generator=g), torch.where(torch.randn(12, 8, generator=g) >= 0, 1.0, -1.0)
    x = torch.randn(3, 4, 8, generator=g, requires_grad=True)
    scale = (torch.rand(12, generator=g) * 0.1).requires_grad_(True)
    out = _DistillMatmul.apply(x, w, None, signs, scale)
    gout = torch.randn(out.shape, generator=g)
    out.backward(gout)
    got = (x.grad.clone(), scale.grad.clone())
    x.grad, scale.grad = None, None
    ref = x @ (w + scale[:, None] * signs).T
    torch.testing.assert_close(out, ref.detach(), atol=1e-5, rtol=1e-5)
    ref.backward(gout)
    torch.testing.assert_close(got[0], x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], scale.grad, atol=1e-4, rtol=1e-5)


def test_embedding_delta_distills_only_scales_saves_and_serves(tmp_path):
    base, ft, tok = _pair_with_embedding("tiny-qwen2")
    calib = ids_for(tok, n=8, seq=32)
    init = BitDelta(base=base, embeddings=True).compress(ft)
    bd = BitDelta(base=base, steps=20, lr=2e-3, batch_size=4, embeddings=True)
    model = bd(ft, calib)
    assert bd.report_.final_loss < bd.report_.init_loss
    emb = model.get_input_embeddings()
    assert model.get_output_embeddings().scale is emb.scale  # still tied after training
    assert not torch.equal(emb.scale, init.get_input_embeddings().scale)
    for n, p in model.named_parameters():
        if not n.endswith(".scale"):
            assert p is base.get_parameter(n)
    path = save_delta(model, tmp_path / "emb.safetensors", base)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.signs" in keys and not any(k.startswith("lm_head") for k in keys)  # tied: once
    back = load_delta(base, path)
    ids = ids_for(tok, n=3, seq=10, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert back.get_output_embeddings().scale is back.get_input_embeddings().scale
    # two tenants with embedding deltas in one batch equal each alone, row by row
    ft2 = copy.deepcopy(ft)
    with torch.no_grad():
        ft2.get_input_embeddings().weight.mul_(-1.0)
    tenants = {"a": back, "b": BitDelta(base=base, embeddings=True).compress(ft2)}
    server = MultiTenant(base, tenants)
    rows = ["b", "a", "b"]
    with torch.no_grad():
        logits = server(ids, rows).logits
        for i, t in enumerate(rows):
            torch.testing.assert_close(logits[i], tenants[t](ids[i:i + 1]).logits[0], atol=1e-4, rtol=1e-4)
        out = server.generate(ids, rows, max_new_tokens=5, do_sample=False, pad_token_id=0)
        for i, t in enumerate(rows):
            assert torch.equal(out[i], tenants[t].generate(ids[i:i + 1], max_new_tokens=5, do_sample=False,
                                                           pad_token_id=0)[0])
    vocab, dim = emb.num_embeddings, emb.embedding_dim
    assert server.delta_bytes() < 2 * (bd.report_.delta_bytes + vocab * dim)  # the tied head's signs held once
    with pytest.raises(ConfigError, match="same layers"):
        MultiTenant(base, {"a": back, "plain": BitDelta(base=base).compress(ft)})


def test_multi_binary_linear_per_row_scales():
    from llmdeploy.kernels.binary import NATIVE_MAX_ROWS, multi_binary_linear
    g = torch.Generator().manual_seed(4)
    base = torch.nn.Linear(40, 24)
    packed = torch.stack([pack_signs(torch.randn(24, 40, generator=g)) for _ in range(3)])
    scales = torch.rand(3, 24, generator=g) * 0.05
    for n in (5, NATIVE_MAX_ROWS + 9):
        x = torch.randn(n, 40, generator=g)
        tenant = torch.randint(0, 3, (n,), generator=g)
        with torch.no_grad():
            ref = torch.stack([base(x[i]) + scales[tenant[i]] * (unpack_signs(packed[tenant[i]], 40) @ x[i])
                               for i in range(n)])
            torch.testing.assert_close(multi_binary_linear(x, base, packed, scales, tenant), ref,
                                       atol=1e-5, rtol=1e-5)
