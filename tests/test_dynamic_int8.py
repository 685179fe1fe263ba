import pytest
import torch

import llmdeploy
from llmdeploy.quant import DynamicInt8, DynamicInt8Linear
from llmdeploy.quant.dynamic_int8 import int8_matmul, quantize_per_row

from .conftest import ids_for


@pytest.mark.parametrize("rows,k", [(3, 96), (40, 96), (5, 2500)])
def test_int8_matmul_is_exact(rows, k):
    a = torch.randint(-127, 128, (rows, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (24, k), dtype=torch.int8)
    a[0] = 127  # worst case: the largest possible sums
    b[0] = 127
    got = int8_matmul(a, b)
    assert got.dtype == torch.int32
    assert torch.equal(got, a.long().mm(b.long().T).int())


@pytest.mark.parametrize("bias", [False, True])
def test_matches_float_reference_within_bound(bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=bias)
    mod = DynamicInt8Linear.from_linear(lin)
    x = torch.randn(2, 7, 64) * 3
    y = mod(x)
    # 1) Equal to the same arithmetic in float64 (fake quantization), up to float rounding.
    xq, xs = quantize_per_row(x.reshape(-1, 64))
    wq, ws = quantize_per_row(lin.weight.detach())
    ref_q = (xq.double() * xs.double()) @ (wq.double() * ws.double()).T
    if bias:
        ref_q = ref_q + lin.bias.double()
    torch.testing.assert_close(y.reshape(-1, 48).double(), ref_q, rtol=1e-5, atol=1e-5)
    # 2) Within the analytic bound of the unquantized product:
    #    |Δy| <= Σ_k |x_k||Δw_k| + |Δx_k||w_k| + |Δx_k||Δw_k|, |Δx| <= s_x/2, |Δw| <= s_w/2.
    x2 = x.reshape(-1, 64).double()
    w = lin.weight.detach().double()
    dx = xs.double() / 2
    dw = ws.double() / 2
    bound = x2.abs().sum(-1, keepdim=True) * dw.T + dx * w.abs().sum(-1)[None] + dx * dw.T * 64
    exact = torch.nn.functional.linear(x2, w, None if not bias else lin.bias.double())
    err = (y.reshape(-1, 48).double() - exact).abs()
    assert (err <= bound + 1e-6).all()
    assert err.max() > 0  # it really is quantized


def test_dynamic_int8_on_model():
    model, tok = llmdeploy.load("tiny-opt")
    ids = ids_for(tok)
    ref = model(ids).logits
    DynamicInt8()(model)
    names = llmdeploy.get_adapter(model).linear_names()
    assert all(isinstance(model.get_submodule(n), DynamicInt8Linear) for n in names)
    got = model(ids).logits
    assert (got - ref).abs().mean() / ref.abs().mean() < 0.05
    fp = llmdeploy.eval.footprint(model)
    assert 8.0 < fp.compressed_bits_per_param < 9.0
