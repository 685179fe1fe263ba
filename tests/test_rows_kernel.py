"""The few-row dense linear (kernels/rows.py) against F.linear, on every SIMD path this CPU runs."""

import pytest
import torch
import torch.nn.functional as F

from llmdeploy.kernels import native, rows, use_reference

pytestmark = pytest.mark.skipif(not rows.available(), reason="no C compiler: the row kernel is not built")


@pytest.mark.parametrize("isa", native.available_isas())
@pytest.mark.parametrize("shape", [(13, 37), (8, 64), (1, 5), (576, 200)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_rows_equals_f_linear(isa, shape, bias):
    g = torch.Generator().manual_seed(0)
    n_out, n_in = shape
    w = torch.randn(n_out, n_in, generator=g)
    b = torch.randn(n_out, generator=g) if bias else None
    with native.isa(isa):
        assert rows.simd() >= 0
        # up to 6 rows (AVX-512) or 3 (AVX2): one pass over each block of outputs; more: passes of
        # that many rows and a remainder of every size
        for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 16, 41, 64, 70):
            x = torch.randn(2, m, n_in, generator=g)[1]  # a view that is not at offset 0
            y = rows.linear_rows(x, w, b)
            ref = F.linear(x.double(), w.double(), None if b is None else b.double())
            assert y.shape == (m, n_out) and y.dtype == torch.float32
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * n_in ** 0.5)
            # every row is computed exactly as it would be alone (the property tree verification uses)
            alone = torch.cat([rows.linear_rows(x[i:i + 1], w, b) for i in range(m)])
            assert torch.equal(y, alone)
        xt = torch.randn(n_in, 3, generator=g).t()  # non-contiguous input
        torch.testing.assert_close(rows.linear_rows(xt, w, b), F.linear(xt, w, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m", [5, 9, 13])
def test_simd_and_portable_paths_agree_bit_for_bit(m):
    # 5 rows: one pass of the 256-bit blocks; 9 and 13: the AVX-512 build's paired-output blocks
    # (two outputs per 512-bit register) and their 22 % 8 = 6 outputs left to the portable sum
    g = torch.Generator().manual_seed(1)
    w, b, x = torch.randn(22, 45, generator=g), torch.randn(22, generator=g), torch.randn(m, 45, generator=g)
    outs = []
    for isa in native.available_isas():
        with native.isa(isa):
            outs.append(rows.linear_rows(x, w, b))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def _count_rows(monkeypatch) -> list[int]:
    """The row counts of every kernel call from now on (the kernel still runs)."""
    calls: list[int] = []
    real = rows._fn

    def counting(symbol):
        fn = real(symbol)
        return lambda *a: (calls.append(a[4]), fn(*a))[1]

    monkeypatch.setattr(rows, "_fn", counting)
    return calls


def test_few_row_linears_routes_small_inputs_and_restores(monkeypatch):
    from llmdeploy.quant import RTNLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 24)
    quant = RTNLinear.from_linear(torch.nn.Linear(64, 64), 4, 64, False)
    model = torch.nn.Sequential(lin, torch.nn.ReLU(), torch.nn.Linear(24, 64, bias=False), quant)
    x_small, x_big = torch.randn(3, 64), torch.randn(rows.MAX_ROWS + 1, 64)
    with torch.no_grad():
        ref_small, ref_big = model(x_small), model(x_big)
    calls = _count_rows(monkeypatch)
    with torch.no_grad(), rows.few_row_linears(model) as n:
        assert n == 2  # the two nn.Linear layers, not the quantized one (it has its own kernel)
        assert "forward" in lin.__dict__
        out_small = model(x_small)
        assert calls == [3, 3]  # both layers, 3 rows each
        out_big = model(x_big)  # more rows than MAX_ROWS: BLAS, exactly as without the block
        assert calls == [3, 3]
        assert torch.equal(lin(x_small), rows.linear_rows(x_small, lin.weight, lin.bias))
    assert "forward" not in lin.__dict__  # restored
    torch.testing.assert_close(out_small, ref_small, rtol=1e-5, atol=1e-5)
    assert torch.equal(out_big, ref_big)

    # an input that needs gradients keeps autograd (F.linear)
    with rows.few_row_linears(model):
        y = lin(x_small.requires_grad_())
    y.sum().backward()
    assert lin.weight.grad is not None and x_small.grad is not None

    with use_reference(), rows.few_row_linears(model) as n:
        assert n == 0 and "forward" not in lin.__dict__


def test_generate_verifies_trees_through_the_row_kernel(monkeypatch):
    """The engine routes the model's and a draft model's linears through the kernel (trees of
    several rows included), and greedy output is the same with and without it."""
    import copy

    import llmdeploy
    from llmdeploy import decode

    model, _ = llmdeploy.load("tiny-llama")
    draft = decode.DraftModel(copy.deepcopy(model), n_draft=3)  # its own linears, not the model's
    prompts = [[1, 5, 9, 13], [2, 4, 6, 8, 10, 12, 14]]
    ref = decode.generate(model, None, prompts, 10, drafter=draft, row_kernel=False).sequences
    rows_seen = _count_rows(monkeypatch)
    out = decode.generate(model, None, prompts, 10, drafter=draft)
    assert out.sequences == ref
    assert 8 in rows_seen  # verification: 2 rows x (root + 3 drafts)
    assert 2 in rows_seen  # the draft model's one-token steps (the model itself never runs 2 rows here)
    assert all("forward" not in m.__dict__ for net in (model, draft.draft) for m in net.modules())  # restored


def test_functional_linear_is_routed_only_inside_a_block(monkeypatch):
    """rows.linear (a drafter's cut LM head) is F.linear outside few_row_linears and the row kernel
    inside it, up to the block's row limit and without gradients."""
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    x_small, x_big = torch.randn(5, 24, generator=g), torch.randn(9, 24, generator=g)
    calls = _count_rows(monkeypatch)
    assert torch.equal(rows.linear(x_small, w, b), F.linear(x_small, w, b)) and calls == []
    with torch.no_grad(), rows.few_row_linears(torch.nn.Sequential(), max_rows=8):
        assert torch.equal(rows.linear(x_small, w, b), rows.linear_rows(x_small, w, b))
        assert calls == [5, 5]
        assert torch.equal(rows.linear(x_big, w, b), F.linear(x_big, w, b)) and calls == [5, 5]  # over the limit
    with rows.few_row_linears(torch.nn.Sequential()):
        y = rows.linear(x_small, w.requires_grad_(), b)  # needs gradients: F.linear
    y.sum().backward()
    assert w.grad is not None and calls == [5, 5]
    assert torch.equal(rows.linear(x_small, w.detach(), b), F.linear(x_small, w.detach(), b))  # block left


def test_linear_rows_falls_back_for_other_dtypes():
    w, x = torch.randn(6, 16, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    assert torch.equal(rows.linear_rows(x, w), F.linear(x, w))
