"""The sparse CPU kernel (bitmask + kept values; N:M through the same layout) against plain torch."""

import pytest
import torch

import llmdeploy
from llmdeploy.kernels import native, use_reference
from llmdeploy.kernels import sparse as S
from llmdeploy.prune import Magnitude, SparseLinear

from .conftest import assert_logits_same_on_every_path

pytestmark = pytest.mark.skipif(not S.available(), reason="no C compiler for the sparse kernel")


def _pruned(out_f, in_f, pattern, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    if pattern == "2:4":
        grp = w.reshape(out_f, -1, 4)
        idx = grp.abs().topk(2, -1).indices
        keep = torch.zeros_like(grp, dtype=torch.bool).scatter_(-1, idx, True).reshape(out_f, in_f)
    else:
        keep = torch.rand(out_f, in_f, generator=g) > pattern
        keep[0] = False  # an empty row
        keep[-1] = True  # a full row
    return w * keep, keep


@pytest.mark.parametrize("isa", native.available_isas())  # every SIMD path this CPU runs
@pytest.mark.parametrize("pattern", [0.5, 0.7, 0.95, "2:4"])
@pytest.mark.parametrize(("out_f", "in_f"), [(13, 48), (64, 16), (200, 96)])
@pytest.mark.parametrize("rows", [1, 4, 64])
def test_sparse_kernel_equals_reference(isa, pattern, out_f, in_f, rows):
    with native.isa(isa):
        _check_kernel(pattern, out_f, in_f, rows)


def _check_kernel(pattern, out_f, in_f, rows):
    w, keep = _pruned(out_f, in_f, pattern)
    kw = S.to_kernel_layout(keep, w[keep])
    assert torch.equal(S.dense_weight(kw), w)
    bias = torch.randn(out_f)
    x = torch.randn(rows, 2 * in_f)[:, ::2]  # non-contiguous
    ref = S.sparse_matmul_reference(x, keep, w[keep], bias)
    torch.testing.assert_close(S.sparse_matmul(x, kw, bias), ref, atol=1e-4, rtol=1e-4)
    x3 = torch.randn(2, rows, in_f)
    torch.testing.assert_close(S.sparse_matmul(x3, kw), S.sparse_matmul_reference(x3, keep, w[keep]),
                               atol=1e-4, rtol=1e-4)


def test_layout_reads_only_kept_values_and_refuses_bad_shapes():
    w, keep = _pruned(32, 64, 0.75)
    kw = S.to_kernel_layout(keep, w[keep])
    assert kw.values.numel() == int(keep.sum()) + S.VALUE_PADDING and not kw.values[-S.VALUE_PADDING:].any()
    assert kw.nbytes < 0.35 * w.numel() * 4  # 1 bit + 25% of 32 per weight, plus row offsets
    with pytest.raises(ValueError, match="divisible by 16"):
        S.to_kernel_layout(keep[:, :40], w[:, :40][keep[:, :40]])
    with pytest.raises(ValueError, match="values for"):
        S.to_kernel_layout(keep, w[keep][:-1])


@pytest.mark.parametrize("pattern", [0.5, "2:4"])
def test_sparse_linear_serves_decode_with_the_faster_path(pattern):
    w, keep = _pruned(96, 64, pattern, seed=3)
    lin = torch.nn.Linear(64, 96)
    lin.weight.data = w
    n, m = (2, 4) if pattern == "2:4" else (0, 0)
    mod = SparseLinear.from_linear(lin, n=n, m=m)
    assert mod.format == ("nm" if m else "bitmask")
    assert torch.equal(mod.keep_mask(), w != 0) or m  # N:M keeps exactly its positions
    x = torch.randn(3, 64)
    with torch.no_grad():
        fast = mod(x)
        with use_reference():
            ref = mod(x)
    assert mod.kernel_choice_ in ("sparse", "dense")
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
    for choice in ("sparse", "dense"):  # both paths give the layer's output
        kw, _ = mod._cpu_plan()
        mod._cpu_plan_cache = (mod._cpu_plan_cache[0], (kw, mod.dense_weight() if choice == "dense" else None))
        with torch.no_grad():
            torch.testing.assert_close(mod(x), ref, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        mod.values.mul_(2)  # changed in place: the plan is rebuilt
        with use_reference():
            ref2 = mod(x)
        torch.testing.assert_close(mod(x), ref2, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs", [{"sparsity": 0.7}, {"pattern": "2:4"}])
def test_pruned_model_logits_same_on_every_path(kwargs):
    model, tok = llmdeploy.load("tiny-llama")
    model = Magnitude(**kwargs)(model.eval())
    assert_logits_same_on_every_path(model, tok)
