"""The weight-only quantized matmul kernels (RTN/GPTQ layers) against the plain-torch reference."""

import pytest
import torch

import llmdeploy
from llmdeploy.kernels import native, use_reference
from llmdeploy.kernels import quant as Q
from llmdeploy.quant import RTN, RTNLinear
from llmdeploy.quant.rtn import quantize_groupwise

from .conftest import assert_logits_same_on_every_path, ids_for

pytestmark = pytest.mark.skipif(not Q.available(), reason="no C compiler here")


LAYOUTS = [("planes", b) for b in (2, 3, 4, 5, 8)] + [("nibble", b) for b in (1, 2, 3, 4)] + [("byte", 8)]
#: the SIMD paths of the C kernels this CPU can run: AVX-512 (native here or not), AVX2, portable C
ISAS = native.available_isas()


@pytest.mark.parametrize("isa", ISAS)
def test_each_instruction_set_builds_its_own_path(isa):
    from llmdeploy.kernels import int8
    with native.isa(isa):
        simd, simd8 = Q.simd(), int8.simd()
    flags = native._cpu_flags()
    expect = {"avx2": 256, "portable": 0}.get(isa, 512 if "avx512f" in flags else 256 if "avx2" in flags else 0)
    assert simd == expect
    assert simd8 == (0 if simd == 0 else 2 if isa == "native" and "avx512_vnni" in flags else 1)
    from llmdeploy.kernels import aqlm_cpu
    from llmdeploy.kernels import sparse as S
    with native.isa(isa):
        assert S.simd() == simd
        assert aqlm_cpu._c("aqlm_simd")() == simd
    with pytest.raises(ValueError, match="unknown instruction set"):
        with native.isa("sse9"):
            pass


def test_a_bad_instruction_set_from_the_environment_is_a_clear_error(monkeypatch):
    from llmdeploy.errors import ConfigError
    monkeypatch.setattr(native, "_ISA", "sse9")  # as LLMDEPLOY_NATIVE_ISA=sse9 would set it
    with pytest.raises(ConfigError, match="LLMDEPLOY_NATIVE_ISA='sse9'"):
        native.library("qmatmul")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout,bits", LAYOUTS)
@pytest.mark.parametrize("out_f,in_f,gs", [(7, 64, 32), (33, 192, 64), (48, 64, 64), (161, 96, 96)])
@pytest.mark.parametrize("rows", [1, 4, 64])
def test_kernel_layouts_equal_reference(isa, layout, bits, out_f, in_f, gs, rows):
    with native.isa(isa):
        _check_layout(layout, bits, out_f, in_f, gs, rows)


def _check_layout(layout, bits, out_f, in_f, gs, rows):
    g = torch.Generator().manual_seed(bits * 100 + in_f + rows)
    w = torch.randn(out_f, in_f, generator=g)
    q, s, z = quantize_groupwise(w, bits, gs, symmetric=False)
    pw = Q.to_kernel_layout(q, s, z, bits, gs, layout=layout)
    x = torch.randn(in_f, rows, generator=g).T  # non-contiguous
    bias = torch.randn(out_f, generator=g)
    for b in (bias, None):
        ref = Q.wonly_matmul_reference(x, q, s, z, gs, b)
        torch.testing.assert_close(Q.wonly_matmul(x, pw, b), ref, atol=1e-4, rtol=1e-4)
    x3 = torch.randn(2, rows, in_f, generator=g)  # batch x tokens x features
    torch.testing.assert_close(Q.wonly_matmul(x3, pw, bias), Q.wonly_matmul_reference(x3, q, s, z, gs, bias),
                               atol=1e-4, rtol=1e-4)
    # the dense weight the prefill path multiplies with is the reference's, bit for bit
    ref_w = ((q.reshape(out_f, -1, gs).float() - z.float()[..., None]) * s.float()[..., None]).reshape(out_f, in_f)
    assert torch.equal(Q.dequantize_kernel_weights(pw), ref_w)


def test_layout_choice_and_refusals():
    assert Q.choose_layout(4, 64) == "nibble" and Q.choose_layout(3, 32) == "nibble"
    assert Q.choose_layout(2, 64) == "nibble" and Q.choose_layout(1, 32) == "nibble"
    assert Q.choose_layout(8, 16) == "byte" and Q.choose_layout(5, 64) == "planes"
    assert Q.choose_layout(4, 16) == "planes" and Q.choose_layout(4, 8) is None
    q = torch.zeros(4, 64, dtype=torch.uint8)
    s, z = torch.ones(4, 4, dtype=torch.float16), torch.zeros(4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="no nibble kernel layout"):
        Q.to_kernel_layout(q, s, z, 5, 16, layout="nibble")


@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_model_logits_same_on_every_path(symmetric):
    model, tok = llmdeploy.load("tiny-llama")
    model = RTN(bits=4, group_size=32, symmetric=symmetric)(model.eval())
    assert_logits_same_on_every_path(model, tok)


def test_kernel_layout_follows_the_stored_codes():
    """Changing the stored codes in place (e.g. a later fine-tuning step) repacks the kernel layout."""
    lin = torch.nn.Linear(64, 16)
    mod = RTNLinear.from_linear(lin, bits=4, group_size=32, symmetric=False)
    x = torch.randn(1, 64)
    with torch.no_grad():
        before = mod(x)
        mod.qweight.bitwise_xor_(0x11)  # flips one bit of every code
        after = mod(x)
        with use_reference():
            ref = mod(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ref, atol=1e-4, rtol=1e-4)


def test_training_through_a_quantized_layer_uses_autograd():
    """Gradients flow through the reference path (the C kernel has no backward)."""
    mod = RTNLinear.from_linear(torch.nn.Linear(64, 16), bits=4, group_size=32, symmetric=False)
    x = torch.randn(2, 64, requires_grad=True)
    mod(x).sum().backward()
    torch.testing.assert_close(x.grad, mod.dequantize().sum(0).expand(2, 64), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("out_f,in_f", [(7, 13), (33, 200), (64, 64), (130, 300)])
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 64])
def test_w8a8_kernel_is_bit_identical_to_the_reference(isa, out_f, in_f, rows):
    from llmdeploy.kernels import int8
    from llmdeploy.quant.dynamic_int8 import DynamicInt8Linear
    g = torch.Generator().manual_seed(out_f + rows)
    with native.isa(isa):
        if int8.simd() < 0:
            pytest.skip("the W8A8 kernel did not build here")
        for bias in (True, False):  # the kernel itself, whichever path this build has (portable C included)
            lin = torch.nn.Linear(in_f, out_f, bias=bias)
            mod = DynamicInt8Linear.from_linear(lin)
            x = 3 * torch.randn(in_f, rows, generator=g).T
            with torch.no_grad(), use_reference():
                ref = mod(x)
            args = (x, mod.qweight, mod.wscale.float().contiguous(), int8.row_sums(mod.qweight),
                    None if mod.bias is None else mod.bias.detach())
            assert torch.equal(int8.w8a8_linear(*args), ref)  # row-major weight
            packed = int8.pack_blocks(mod.qweight)  # and the decode layout, where this build reads one
            assert packed is None or torch.equal(int8.w8a8_linear(*args, packed=packed), ref)
        if not int8.available():
            return  # the layer itself takes torch's path without a SIMD build
        for bias in (True, False):  # the layer's kernel path
            lin = torch.nn.Linear(in_f, out_f, bias=bias)
            mod = DynamicInt8Linear.from_linear(lin)
            x = 3 * torch.randn(in_f, rows, generator=g).T  # non-contiguous
            with torch.no_grad():
                got = mod(x)
                with use_reference():
                    ref = mod(x)
                assert torch.equal(got, ref)
                x3 = torch.randn(2, rows, in_f, generator=g)
                got3 = mod(x3)
                with use_reference():
                    assert torch.equal(got3, mod(x3))


def test_w8a8_model_logits_identical_with_and_without_the_kernel():
    from llmdeploy.quant import DynamicInt8
    model, tok = llmdeploy.load("tiny-llama")
    model = DynamicInt8()(model.eval())
    for seq in (1, 6):
        ids = ids_for(tok, n=2, seq=seq)
        with torch.no_grad():
            fast = model(ids).logits
            with use_reference():
                ref = model(ids).logits
        assert torch.equal(fast, ref)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("out_f,in_f,gs,rows", [(7, 64, 16, 1), (33, 96, 32, 3)])
def test_triton_kernels_equal_reference(bits, symmetric, out_f, in_f, gs, rows):
    from llmdeploy.kernels import quant_triton
    if not quant_triton.available():
        pytest.skip("triton not installed")
    g = torch.Generator().manual_seed(bits + out_f)
    lin = torch.nn.Linear(in_f, out_f)
    mod = RTNLinear.from_linear(lin, bits=bits, group_size=gs, symmetric=symmetric)
    x = torch.randn(rows, in_f, generator=g)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, mod.dequantize(), mod.bias)
        got = quant_triton.wonly_gemv(x, mod.qweight, mod.scales, mod.zeros, bits, gs, mod.bias,
                                      block_o=16, block_k=32)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        w = quant_triton.wonly_dequantize(mod.qweight, mod.scales, mod.zeros, bits, gs, in_f, block_o=16, block_k=32)
        assert torch.equal(w, mod.dequantize())



def test_readme_quotes_the_speed_benchmark():
    """The README's kernel speed-ups are those of benchmarks/results/speed/speed.json."""
    import json
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    res = json.loads((root / "benchmarks/results/speed/speed.json").read_text())
    readme = " ".join((root / "README.md").read_text().split())
    layer = res["layers"]["llama2-7b mlp 11008x4096"]
    for k, label in (("rtn int4 g64", "int4"), ("rtn int3 g64", "int3"), ("rtn int8 g64", "int8"),
                     ("w8a8 dynamic", "W8A8")):
        assert f"{label} {layer[k]['x_dense']:.2f}x" in readme, k
        assert f"{label} {res['model'][k]['decode_x_dense']:.2f}x" in readme, k
    for k, label in (("sparse 50%", "sparse 50%"), ("sparse 2:4", "2:4")):
        assert f"{label} {layer[k]['x_dense']:.2f}x" in readme, k
    for k, label in (("rtn int4 g64 + int8 embedding/head", "int4"), ("w8a8 dynamic + int8 embedding/head", "W8A8"),
                     ("sparse 50%", "pruned 50%"), ("sparse 70%", "70%"), ("sparse 2:4", "2:4")):
        assert f"{label} {res['model'][k]['decode_x_dense']:.2f}x" in readme, k
    for k, label in (("aqlm 2x8 g8", "AQLM 2x8"), ("aqlm 1x16 g8", "AQLM 1x16")):
        assert f"{label} {layer[k]['x_dense']:.2f}x" in readme, k
    m = res["model"]
    assert (f"AQLM 2x8 {m['aqlm 2x8 g8 (random codes)']['decode_x_dense']:.2f}x and 1x16 "
            f"{m['aqlm 1x16 g8 (random codes)']['decode_x_dense']:.2f}x") in readme
    mib = {k: m[k]["bytes"] / 2**20 for k in ("aqlm 1x16 g8 (random codes)", "dense fp32")}
    assert (f"the 1x16 model takes {mib['aqlm 1x16 g8 (random codes)']:.1f} MiB against dense's "
            f"{mib['dense fp32']:.1f} MiB") in readme
    a8 = m["aqlm 2x8 g8 (random codes) + int8 embedding/head"]
    assert f"AQLM 2x8 {a8['decode_x_dense']:.2f}x ({a8['compiled_decode_x_dense']:.2f}x compiled" in readme
    ms = {k: 1e3 / m[k]["decode_tok_s"] for k in ("floor: decoder linears removed", "dense fp32")}
    assert (f"still takes {ms['floor: decoder linears removed']:.1f} ms of the dense model's "
            f"{ms['dense fp32']:.1f} ms") in readme
    pre = [r["prefill_x_dense"] for k, r in m.items() if k not in ("dense fp32", "floor: decoder linears removed")]
    assert f"prefill of 512 tokens {min(pre):.2f}x–{max(pre):.2f}x dense" in readme
    floor = res["model"]["floor: decoder linears removed"]
    assert f"more than {floor['decode_x_dense']:.2f}x faster" in readme
    kern = {(r["config"], r["kernel"]): r for r in
            json.loads((root / "benchmarks/results/kernels/aqlm_cpu.json").read_text())["rows"]}
    a28, a16 = kern[("2x8 g8", "llmdeploy kernel")], kern[("1x16 g8", "llmdeploy kernel")]
    assert (f"runs in {a28['ms']:.2f} ms: {a28['speedup_vs_dense']:.2f}x torch's dense fp32 matvec and "
            f"{a28['speedup_vs_aqlm_package']:.2f}x the `aqlm` package's") in readme
    assert f"{a16['speedup_vs_dense']:.2f}x dense and {a16['speedup_vs_aqlm_package']:.1f}x the package's" in readme
    avx2 = kern.get(("2x8 g8", "llmdeploy kernel, AVX2 path"))
    if avx2 is not None:  # measured on an AVX-512 CPU
        assert f"its AVX2 gather path, same results bit for bit, {avx2['ms']:.2f} ms" in readme
    assert f"dense {res['model']['dense fp32']['decode_tok_s']:.1f} tok/s" in readme
    if "compiled_decode_x_dense" in m["rtn int4 g64"]:
        c4, c4h = m["rtn int4 g64"], m["rtn int4 g64 + int8 embedding/head"]
        assert (f"int4 is {c4['compiled_decode_x_dense']:.2f}x the compiled dense model and "
                f"{c4h['compiled_decode_x_dense']:.2f}x with the int8 head") in readme
