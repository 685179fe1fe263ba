import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmdeploy
from llmdeploy.compress.engine import run_blockwise
from llmdeploy.errors import CheckpointError, ConfigError
from llmdeploy.kernels import aqlm_cpu, aqlm_triton, importable, native, use_reference
from llmdeploy.quant import AQLM, RTN, AQLMLinear, beam_search_codes
from llmdeploy.quant import aqlm as aqlm_mod
from llmdeploy.quant.aqlm import init_aq, layer_error
from llmdeploy.quant.aqlm_linear import dequantize, pack_codes, unpack_codes
from llmdeploy.quant.rtn import dequantize_groupwise, quantize_groupwise

from .conftest import ids_for

CONFIGS = [  # (num_codebooks, nbits, in_group, out_group)
    (1, 16, 8, 1), (2, 8, 8, 1), (1, 8, 8, 1), (4, 8, 8, 1), (8, 8, 8, 1), (2, 8, 16, 1), (1, 16, 16, 1),
    (2, 8, 8, 2), (3, 5, 4, 1),
]


def random_layer(c, nb, ig, og=1, out_f=48, in_f=64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = AQLMLinear(in_f, out_f, c, nb, ig, og, bias=bias)
    with torch.no_grad():
        m.codebooks.copy_(torch.randn(m.codebooks.shape, generator=g))
        m.scales.copy_(torch.rand(m.scales.shape, generator=g) + 0.5)
        m.codes.copy_(pack_codes(torch.randint(0, 2**nb, m.codes.shape, generator=g), nb))
        if bias:
            m.bias.copy_(torch.randn(out_f, generator=g))
    return m


def explicit_weight(m: AQLMLinear) -> torch.Tensor:
    """Decode element by element, straight from the format's definition."""
    codes = unpack_codes(m.codes, m.nbits_per_codebook)
    w = torch.zeros(m.out_features, m.in_features)
    og, ig = m.out_group_size, m.in_group_size
    for i in range(codes.shape[0]):
        for j in range(codes.shape[1]):
            block = sum(m.codebooks[c, codes[i, j, c]] for c in range(m.num_codebooks))
            w[i * og:(i + 1) * og, j * ig:(j + 1) * ig] = m.scales[i, 0, 0, 0] * block
    return w


@pytest.mark.parametrize("cfg", CONFIGS)
def test_reference_forward_is_explicit_dequantization(cfg):
    m = random_layer(*cfg)
    w = explicit_weight(m)
    assert torch.allclose(m.dequantize(), w, atol=1e-5)
    x = torch.randn(5, 64)
    assert torch.allclose(m.forward_reference(x), x @ w.T + m.bias, atol=1e-4)
    assert m.codes.dtype == (torch.int16 if cfg[1] > 8 else torch.int8)
    assert m.codes.shape == (48 // cfg[3], 64 // cfg[2], cfg[0])
    assert m.codebooks.shape == (cfg[0], 2 ** cfg[1], cfg[3], cfg[2])


def test_code_packing_matches_the_aqlm_package():
    codes = torch.arange(256)
    packed = pack_codes(codes, 8)
    assert packed.dtype == torch.int8 and packed[255] == -1 and packed[127] == 127 and packed[128] == -128
    assert torch.equal(unpack_codes(packed, 8), codes)
    big = torch.tensor([0, 32767, 32768, 65535])
    assert torch.equal(unpack_codes(pack_codes(big, 16), 16), big)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[3] == 1])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("out_f", [46, 150])  # tails of the 4-row and 64-output steps; full 64-output tiles
def test_cpu_kernel_equals_reference(cfg, tokens, out_f):
    if not aqlm_cpu.available():
        pytest.skip("no C compiler and numba not installed")
    m = random_layer(*cfg, out_f=out_f)
    x = torch.randn(tokens, 64)
    with torch.no_grad():
        ref = m.forward_reference(x)
        out = aqlm_cpu.aqlm_gemv(x, m)
        auto = m(x)  # the dispatch picks the CPU kernel for a few fp32 tokens
        paths = {"numba": aqlm_cpu.aqlm_gemv_numba(x, m) if importable("numba") else None}
        for isa in native.available_isas():  # every SIMD path of the C kernel this CPU runs
            with native.isa(isa):
                paths[isa] = aqlm_cpu.aqlm_gemv_c(x, m) if aqlm_cpu._c("aqlm_simd") is not None else None
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-5)
    assert torch.allclose(auto, out)
    for name, got in paths.items():
        if got is not None:
            assert torch.allclose(got, ref, atol=1e-4, rtol=1e-5), name
    if cfg[1] == 8 and paths.get("avx2") is not None:
        # the same FMA-built table, each output's entries added in one order (AVX-512 permutes, AVX2 gathers)
        assert torch.equal(paths["native"], paths["avx2"])


def test_cpu_table_kernel_any_thread_count_and_a_reused_scratch_buffer():
    """The table kernel splits input groups among threads (partial sums added at the end) and keeps
    its table in a per-thread buffer that grows: any thread count, including more threads than
    groups, and a small layer after a large one (the buffer reused, not cleared) give the reference."""
    if not aqlm_cpu.c_available():
        pytest.skip("no C compiler here")
    big, small = random_layer(2, 8, 8, out_f=200, in_f=512, seed=1), random_layer(2, 8, 8, out_f=46, in_f=16, seed=2)
    old = torch.get_num_threads()
    try:
        with torch.no_grad():
            for threads in (1, 2, 3):  # in_f=16: 2 groups, so a third thread gets none
                torch.set_num_threads(threads)
                for m, tokens in ((big, 5), (small, 1), (big, 1), (small, 3)):
                    x = torch.randn(tokens, m.in_features)
                    torch.testing.assert_close(aqlm_cpu.aqlm_gemv_c(x, m), m.forward_reference(x),
                                               atol=1e-4, rtol=1e-5)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[3] == 1])
def test_cpu_prefill_decodes_the_reference_weight(cfg):
    """Many tokens on CPU: the weight decoded in C (bit for bit the reference's up to 4 codebooks), one matmul."""
    if not aqlm_cpu.c_available():
        pytest.skip("no C compiler here")
    torch.manual_seed(0)
    m = random_layer(*cfg, out_f=46)
    x = torch.randn(2, 20, 64)  # 40 tokens: above the matrix-vector kernel's limit
    with torch.no_grad():
        for isa in native.available_isas():
            with native.isa(isa):
                if m.num_codebooks <= 4:  # torch sums 8 codebooks in another order
                    assert torch.equal(aqlm_cpu.dequantize_c(m), m.dequantize())
                torch.testing.assert_close(aqlm_cpu.dequantize_c(m), m.dequantize(), atol=1e-6, rtol=1e-6)
        auto = m(x)
        ref = m.forward_reference(x)
    # 8 codebooks: the weight's last-bit differences (other summation order) add up over 64 inputs
    tol = 1e-5 if m.num_codebooks <= 4 else 1e-4
    torch.testing.assert_close(auto, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("cfg", [(2, 8), (1, 16)])
def test_aqlm_model_logits_same_on_every_path(cfg):
    """A model whose decoder linears are all AQLM layers: decode-sized inputs (table / codeword
    kernels) and a prefill (weight decoded in C) give the reference's logits."""
    from llmdeploy.models.adapters import get_adapter

    from .conftest import assert_logits_same_on_every_path
    if not aqlm_cpu.available():
        pytest.skip("no C compiler and numba not installed")
    model, tok = llmdeploy.load("tiny-llama")
    for i, name in enumerate(get_adapter(model).linear_names()):
        lin = model.get_submodule(name)
        model.set_submodule(name, random_layer(*cfg, 8, 1, out_f=lin.out_features, in_f=lin.in_features,
                                               bias=lin.bias is not None, seed=i))
    assert_logits_same_on_every_path(model.eval(), tok)


def test_cpu_kernel_follows_code_changes():
    if not aqlm_cpu.available():
        pytest.skip("numba not installed")
    m = random_layer(2, 8, 8)
    x = torch.randn(1, 64)
    with torch.no_grad():
        first = aqlm_cpu.aqlm_gemv(x, m)
        m.codes.copy_(pack_codes(torch.randint(0, 256, m.codes.shape), 8))  # e.g. load_state_dict
        assert torch.allclose(aqlm_cpu.aqlm_gemv(x, m), m.forward_reference(x), atol=1e-4)
        assert not torch.allclose(aqlm_cpu.aqlm_gemv(x, m), first)
    assert m.codes.shape == (48, 8, 2)  # the parameter keeps the aqlm layout


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[3] == 1 and c[2] & (c[2] - 1) == 0])
def test_triton_kernels_equal_reference(cfg):
    if not aqlm_triton.available():
        pytest.skip("triton not installed")
    m = random_layer(*cfg, out_f=40)  # not a multiple of the row block: masking is exercised
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = m.forward_reference(x)
        assert torch.allclose(aqlm_triton.aqlm_gemv(x, m, block_o=16, block_j=4), ref, atol=1e-4)
        assert torch.allclose(aqlm_triton.aqlm_dequantize(m, block_o=16, block_j=4), m.dequantize(), atol=1e-6)
        assert torch.allclose(aqlm_triton.aqlm_dequant_matmul(x, m), ref, atol=1e-4)


def test_backward_through_codebooks_and_scales():
    m = random_layer(2, 8, 8).double()
    m.codebooks.requires_grad_(True)
    m.scales.requires_grad_(True)
    x = torch.randn(4, 64, dtype=torch.float64, requires_grad=True)
    m(x).pow(2).sum().backward()
    g_books, g_scales, g_x = m.codebooks.grad.clone(), m.scales.grad.clone(), x.grad.clone()
    # the same gradients through an explicit, differentiable reconstruction
    books = m.codebooks.detach().clone().requires_grad_(True)
    scales = m.scales.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    w = dequantize(m.codes, books, scales, 8)
    (torch.nn.functional.linear(x2, w, m.bias.detach())).pow(2).sum().backward()
    assert torch.allclose(g_books, books.grad) and torch.allclose(g_scales, scales.grad)
    assert torch.allclose(g_x, x2.grad)
    assert g_books.abs().sum() > 0


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), beam=st.sampled_from([1, 2, 5]), nb=st.sampled_from([2, 4, 6]),
       og=st.sampled_from([1, 2]))
def test_beam_search_never_increases_the_objective(seed, beam, nb, og):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 32, generator=g)
    x = torch.randn(80, 32, generator=g) @ torch.randn(32, 32, generator=g)
    h = x.T @ x / 80
    codes, books, scales = init_aq(w, 2, nb, 4, og, 3, g)
    # start from random codes too, not only from k-means
    codes = torch.randint(0, 2**nb, codes.shape, generator=g) if seed % 2 else codes
    before = layer_error(w, dequantize(codes, books, scales, nb), h)
    new = beam_search_codes(w, h, codes, books, scales, beam)
    after = layer_error(w, dequantize(new, books, scales, nb), h)
    assert after <= before * (1 + 1e-5) + 1e-6
    assert new.shape == codes.shape and new.min() >= 0 and new.max() < 2**nb


def test_beam_search_tracks_the_exact_objective():
    """A regression check of the beam bookkeeping (not a theorem: a beam need not contain the
    greedy path): on this seed a beam of 8 ends no worse than greedy."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 32, generator=g)
    x = torch.randn(100, 32, generator=g)
    h = x.T @ x / 100
    codes, books, scales = init_aq(w, 2, 4, 4, 1, 3, g)
    greedy = layer_error(w, dequantize(beam_search_codes(w, h, codes, books, scales, 1), books, scales, 4), h)
    wide = layer_error(w, dequantize(beam_search_codes(w, h, codes, books, scales, 8), books, scales, 4), h)
    assert wide <= greedy * (1 + 1e-5)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_every_configuration_quantizes_a_layer(cfg):
    c, nb, ig, og = cfg
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(200, 64, generator=g)
    res = aqlm_mod.quantize_layer(w, x.T @ x / 200, AQLM(num_codebooks=c, nbits_per_codebook=nb, in_group_size=ig,
                                                        out_group_size=og, max_iter=2, steps_per_round=5), g)
    assert res.codes.shape == (32 // og, 64 // ig, c) and 0 <= res.codes.min() and res.codes.max() < 2**nb
    assert res.codebooks.shape == (c, 2**nb, og, ig)
    assert all(torch.isfinite(torch.tensor(res.errors)))
    err = layer_error(w, dequantize(res.codes, res.codebooks, res.scales, nb), x.T @ x / 200) \
        / layer_error(w, torch.zeros_like(w), x.T @ x / 200)
    assert err.item() == pytest.approx(res.error, rel=1e-3, abs=1e-9) and res.error <= res.errors[0]


def _tiny():
    return llmdeploy.load("tiny-llama")


def _calib(tok, n=8, seq=48):
    return ids_for(tok, n=n, seq=seq, seed=0)


FAST = dict(max_iter=3, steps_per_round=15, kmeans_iters=8, finetune_epochs=1)


def test_aqlm_layer_error_below_rtn_at_fewer_bits():
    """On the tiny model's block 0: AQLM 2x4 with groups of 4 (2.9-3.25 bits per weight on these
    small layers, codebooks and scales counted) has a lower layer error than RTN 2-bit with groups
    of 16 (3.5 bits: fp16 scale and 8-bit zero per group) on every linear."""
    model, tok = _tiny()
    calib = _calib(tok)
    hess = {}

    def process(ctx):
        if ctx.index == 0:
            for name, s in ctx.collect_stats().items():
                hess[name] = s.xtx / s.n_rows

    run_blockwise(model, calib, process)
    cfg = AQLM(num_codebooks=2, nbits_per_codebook=4, in_group_size=4, **FAST)
    block = llmdeploy.get_adapter(model).blocks()[0]
    for name, lin in llmdeploy.get_adapter(model).block_linears(block).items():
        w, h = lin.weight.detach(), hess[name]
        res = aqlm_mod.quantize_layer(w, h, cfg, torch.Generator().manual_seed(0))
        q = AQLMLinear(lin.in_features, lin.out_features, 2, 4, 4, bias=False)
        with torch.no_grad():
            q.codes.copy_(pack_codes(res.codes, 4))
            q.codebooks.copy_(res.codebooks)
            q.scales.copy_(res.scales)
        aqlm_err = layer_error(w, q.dequantize(), h)
        codes_rtn, scale, zero = quantize_groupwise(w, bits=2, group_size=16, symmetric=False)
        rtn_err = layer_error(w, dequantize_groupwise(codes_rtn, scale, zero, 16, torch.float32), h)
        assert q.paper_bits_per_param() <= 2 + (16 + 8) / 16
        assert aqlm_err < rtn_err, (name, aqlm_err, rtn_err)
        assert res.error < res.errors[0]  # the rounds improve on the k-means start


def test_quantize_tiny_model_save_load_and_transformers(tmp_path):
    model, tok = _tiny()
    calib = _calib(tok, n=4, seq=32)
    q = AQLM(**FAST)(copy.deepcopy(model), calib)
    mods = [m for m in q.modules() if isinstance(m, AQLMLinear)]
    assert len(mods) == 3 * 7 and isinstance(q.lm_head, torch.nn.Linear)
    ids = ids_for(tok, n=1, seq=6, seed=1)
    with torch.no_grad():
        ref = q(ids).logits
        with use_reference():
            assert torch.allclose(q(ids).logits, ref, atol=1e-4)
    out = llmdeploy.save(q, tok, tmp_path / "aqlm")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "aqlm" and cfg["num_codebooks"] == 2 and cfg["nbits_per_codebook"] == 8
    assert "lm_head" in cfg["linear_weights_not_to_quantize"]
    assert "lm_head.weight" in cfg["linear_weights_not_to_quantize"]
    loaded, _ = llmdeploy.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    # a published-style directory: no llmdeploy manifest, only the parameter name listed
    pub = tmp_path / "published"
    shutil.copytree(out, pub)
    (pub / "llmdeploy.json").unlink()
    c = json.loads((pub / "config.json").read_text())
    c["quantization_config"]["linear_weights_not_to_quantize"] = ["lm_head.weight"]
    (pub / "config.json").write_text(json.dumps(c))
    published, _ = llmdeploy.load(pub)
    assert isinstance(published.lm_head, torch.nn.Linear)
    with torch.no_grad():
        assert torch.equal(published(ids).logits, ref)
    # transformers with the aqlm package (its CPU kernel races with several numba threads)
    pytest.importorskip("aqlm")
    pytest.importorskip("numba")
    torch.save({"ids": ids, "ref": ref}, tmp_path / "ref.pt")
    code = (
        "import torch\nfrom transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32)\n"
        "assert type(m.model.layers[0].mlp.down_proj).__module__.startswith('aqlm'), type(m.model.layers[0].mlp.down_proj)\n"
        "assert type(m.lm_head) is torch.nn.Linear\n"
        f"r = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n    o = m(r['ids']).logits\n"
        "print('MAXDIFF', (o - r['ref']).abs().max().item())\n"
    )
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    diff = float(res.stdout.split("MAXDIFF")[1])
    assert diff < 1e-4 * ref.abs().max().item(), res.stdout


def test_resume_after_interruption_matches_uninterrupted(tmp_path, monkeypatch):
    model, tok = _tiny()
    calib = _calib(tok, n=4, seq=32)
    cfg = dict(FAST, num_codebooks=1, nbits_per_codebook=6, in_group_size=8)
    full = AQLM(**cfg, checkpoint_dir=str(tmp_path / "a"))(copy.deepcopy(model), calib)
    calls = {"n": 0}
    original = aqlm_mod.quantize_layer

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7 + 3:  # block 0 done and saved, block 1 in progress
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(aqlm_mod, "quantize_layer", interrupting)
    with pytest.raises(KeyboardInterrupt):
        AQLM(**cfg, checkpoint_dir=str(tmp_path / "b"))(copy.deepcopy(model), calib)
    monkeypatch.setattr(aqlm_mod, "quantize_layer", original)
    progress = json.loads((tmp_path / "b" / "walk-1" / "progress-rank0.json").read_text())
    assert list(progress["states"]) == ["1"]  # block 0 finished
    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(aqlm_mod, "quantize_layer", counting)
    resumed = AQLM(**cfg, checkpoint_dir=str(tmp_path / "b"), resume=True)(copy.deepcopy(model), calib)
    assert counted["n"] == 2 * 7  # only blocks 1 and 2 were quantized again
    for (n1, p1), (n2, p2) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # a checkpoint of another run is refused
    with pytest.raises(CheckpointError, match="different run"):
        AQLM(**dict(cfg, seed=1), checkpoint_dir=str(tmp_path / "b"), resume=True)(copy.deepcopy(model), calib)


def test_bad_configurations_fail_before_work():
    model, tok = _tiny()
    calib = _calib(tok, n=2, seq=16)
    with pytest.raises(ConfigError, match="in_group_size=24"):
        AQLM(in_group_size=24)(copy.deepcopy(model), calib)
    with pytest.raises(ConfigError, match="1..16"):
        AQLM(nbits_per_codebook=17)(copy.deepcopy(model), calib)
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        AQLM(resume=True)(copy.deepcopy(model), calib)
    with pytest.raises(ConfigError, match="compressed"):
        AQLM()(RTN(bits=4, group_size=16)(copy.deepcopy(model)), calib)
    with pytest.raises(ConfigError, match="not divisible"):
        AQLMLinear(60, 32, 2, 8, 8)


def test_bits_per_parameter_as_in_the_paper():
    m = AQLMLinear(4096, 11008, 2, 8, 8, bias=False)
    # codes 2 bits + codebooks 2*256*8*16 bits + scales 11008*16 bits
    expected = 2 + (2 * 256 * 8 * 16 + 11008 * 16) / (4096 * 11008)
    assert m.paper_bits_per_param() == pytest.approx(expected)
    m16 = AQLMLinear(4096, 11008, 1, 16, 8, bias=False)
    assert m16.paper_bits_per_param() == pytest.approx(2 + (65536 * 8 * 16 + 11008 * 16) / (4096 * 11008))


def test_block_finetuning_trains_norms_and_biases_found_by_the_adapter():
    """OPT: LayerNorm weights and biases (by role, through the adapter) and every linear bias are
    trained with the codebooks and scales; nothing else moves."""
    model, tok = llmdeploy.load("tiny-opt")
    calib = _calib(tok, n=4, seq=16)
    before = copy.deepcopy(model)
    cfg = dict(num_codebooks=1, nbits_per_codebook=6, in_group_size=8, max_iter=1, steps_per_round=2, kmeans_iters=2,
               finetune_epochs=2, finetune_lr=1e-2, batch_size=2, finetune_batch_size=2)
    q = AQLM(**cfg)(model, calib)
    layer, old = q.model.decoder.layers[0], before.model.decoder.layers[0]
    for path in ("self_attn_layer_norm.weight", "self_attn_layer_norm.bias", "final_layer_norm.weight",
                 "final_layer_norm.bias", "fc1.bias", "self_attn.q_proj.bias", "self_attn.out_proj.bias"):
        assert not torch.equal(layer.get_parameter(path), old.get_parameter(path)), path
    # outside the blocks: untouched
    assert torch.equal(q.model.decoder.final_layer_norm.weight, before.model.decoder.final_layer_norm.weight)
    assert torch.equal(q.lm_head.weight, before.lm_head.weight)
    assert not any(p.requires_grad for m in q.modules() if isinstance(m, AQLMLinear) for p in m.parameters())


def test_block_finetuning_runs_in_float32_for_bf16_models():
    model, tok = llmdeploy.load("tiny-llama", dtype=torch.bfloat16)
    calib = _calib(tok, n=4, seq=16)
    seen = []
    real_adam = torch.optim.Adam

    class Spy(real_adam):
        def __init__(self, params, *a, **kw):
            params = list(params)
            seen.append({p.dtype for p in params})
            super().__init__(params, *a, **kw)

    aq = AQLM(num_codebooks=1, nbits_per_codebook=6, in_group_size=8, max_iter=0, steps_per_round=0,
              kmeans_iters=2, finetune_epochs=1, finetune_lr=1e-3, batch_size=2, finetune_batch_size=4)
    torch.optim.Adam = Spy
    try:
        q = aq(model, calib)
    finally:
        torch.optim.Adam = real_adam
    assert seen and all(s == {torch.float32} for s in seen[-3:])  # the fine-tuning optimizers
    assert {p.dtype for p in q.parameters() if p.is_floating_point()} == {torch.bfloat16}  # cast back
    ft = aq.report_.finetune
    assert len(ft) == 3 and all(v[-1] < v[0] for v in ft.values())  # it learned in fp32


def test_finetune_keep_best_and_early_stop():
    model, tok = _tiny()
    calib = _calib(tok, n=4, seq=16)
    aq = AQLM(num_codebooks=1, nbits_per_codebook=6, in_group_size=8, max_iter=0, steps_per_round=0, kmeans_iters=2,
              finetune_epochs=6, finetune_lr=0.5, finetune_early_stop=1, finetune_keep_best=True, batch_size=2,
              finetune_batch_size=2)
    aq(copy.deepcopy(model), calib)
    for hist in aq.report_.finetune.values():
        assert len(hist) <= 7
        if len(hist) < 7:  # stopped early: the last epoch did not improve on the best before it
            assert hist[-1] >= min(hist[:-1])
    with pytest.raises(ConfigError, match="multiple"):
        AQLM(batch_size=4, finetune_batch_size=6)(copy.deepcopy(model), calib)


def test_cuda_inputs_with_shapes_triton_cannot_take_fall_back():
    from llmdeploy.kernels import aqlm_kernel_for

    class CudaLike:  # what the dispatcher reads of a CUDA tensor
        is_cuda = True
        is_cpu = False
        device = torch.device("cuda")
        dtype = torch.float16

    odd = random_layer(1, 8, 6, in_f=48)  # in_group_size 6: not a power of two
    assert not aqlm_triton.supports(odd) and aqlm_kernel_for(odd, CudaLike(), 1) is None
    even = random_layer(2, 8, 8)
    assert aqlm_triton.supports(even)
    if aqlm_triton.available():
        assert aqlm_kernel_for(even, CudaLike(), 1) is not None


@pytest.mark.parametrize("name", ["aqlm-2x8-paper", "aqlm-1x16-paper"])
def test_paper_recipes_carry_the_reference_settings(name):
    compose, settings = llmdeploy.recipe.load_with_settings(name)
    (aq,) = compose.steps
    assert (aq.max_iter, aq.steps_per_round, aq.kmeans_iters, aq.relative_mse_tolerance) == (1000, 100, 100, 0.01)
    assert (aq.finetune_lr, aq.finetune_epochs, aq.finetune_batch_size) == (1e-5, 10, 32)
    assert aq.finetune_early_stop == 3 and aq.finetune_keep_best
    assert settings == {"n_samples": 1024, "seq_len": 4096}
    assert (aq.num_codebooks, aq.nbits_per_codebook) == ((2, 8) if "2x8" in name else (1, 16))
