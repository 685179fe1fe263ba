import pytest
import torch

import llmdeploy
from llmdeploy.compress import run_blockwise
from llmdeploy.errors import CalibrationDataError
from llmdeploy.models import get_adapter

from .conftest import FAMILIES, ids_for


@pytest.mark.parametrize("name", FAMILIES)
def test_propagated_activations_equal_plain_forward(name):
    model, tok = llmdeploy.load(name)
    calib = ids_for(tok, n=5, seq=40)
    recorded: list[torch.Tensor] = []
    final = run_blockwise(model, calib, batch_size=2, record_inputs=recorded)
    with torch.no_grad():
        hs = model(calib, output_hidden_states=True).hidden_states
    n_blocks = len(get_adapter(model).blocks())
    assert len(recorded) == n_blocks
    for i in range(n_blocks):
        torch.testing.assert_close(recorded[i], hs[i], rtol=1e-5, atol=1e-5)
    # The last hidden state reported by HF has the final norm applied.
    last = get_adapter(model).final_norm()(torch.cat(list(final)))
    torch.testing.assert_close(last, hs[-1], rtol=1e-5, atol=1e-5)


def test_callback_changes_propagate_and_xtx_is_exact():
    model, tok = llmdeploy.load("tiny-llama")
    calib = ids_for(tok, n=3, seq=32)
    recorded: list[torch.Tensor] = []
    seen = {}

    def process(ctx):
        stats = ctx.collect_stats(["mlp.down_proj"])
        seen[ctx.index] = stats["mlp.down_proj"]
        if ctx.index == 0:  # a "compressor" that zeroes the MLP output of block 0
            torch.nn.init.zeros_(ctx.block.mlp.down_proj.weight)

    run_blockwise(model, calib, process, batch_size=2, record_inputs=recorded)
    # Block 1's inputs must be those of the modified model.
    with torch.no_grad():
        hs = model(calib, output_hidden_states=True).hidden_states
    torch.testing.assert_close(recorded[1], hs[1], rtol=1e-5, atol=1e-5)
    # XᵀX of block 0's down_proj inputs, recomputed by hand on the dense block.
    model2, _ = llmdeploy.load("tiny-llama")
    xs = []
    h = model2.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: xs.append(a[0]))
    with torch.no_grad():
        model2(calib)
    h.remove()
    x = torch.cat(xs).reshape(-1, xs[0].shape[-1])
    torch.testing.assert_close(seen[0].xtx, x.T @ x, rtol=1e-4, atol=1e-4)
    assert seen[0].n_rows == x.shape[0]


def test_non_finite_activations_are_reported():
    model, tok = llmdeploy.load("tiny-llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(CalibrationDataError, match="block 1"):
        run_blockwise(model, ids_for(tok, n=2, seq=16))


def test_calibration_must_be_token_ids():
    from llmdeploy.compress.base import check_calibration

    with pytest.raises(CalibrationDataError, match="NaN"):
        check_calibration(torch.tensor([[float("nan"), 1.0]]), "x")
    with pytest.raises(CalibrationDataError, match="2-D"):
        check_calibration(torch.tensor([1, 2, 3]), "x")
    with pytest.raises(CalibrationDataError, match="needs calibration"):
        check_calibration(None, "x")


@pytest.mark.parametrize("name", FAMILIES)
def test_collect_stats_shares_inputs_and_stops_early_without_changing_xtx(name):
    """Linears fed the same tensor share one LinearStats; once a block type's plan is known each
    pass stops after the group's last linear (the next group's first linear never runs) — and
    XᵀX equals hooks on a full plain forward."""
    model, tok = llmdeploy.load(name)
    calib = ids_for(tok, n=5, seq=24)  # 3 batches of 2
    adapter = get_adapter(model)
    groups = adapter.linear_groups(adapter.blocks()[0])
    ref, got, later_calls = {}, {}, {}

    def process(ctx):
        if ctx.index > 1:
            return
        for gi, group in enumerate(groups):
            xs = {p: [] for p in group}
            handles = [ctx.block.get_submodule(p).register_forward_hook(lambda m, a, o, p=p, xs=xs: xs[p].append(a[0]))
                       for p in group]
            ctx.forward()
            for h in handles:
                h.remove()
            for p in group:
                x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs[p]])
                ref[ctx.index, p] = x.T @ x
            calls = []
            if gi + 1 < len(groups):
                nxt = ctx.block.get_submodule(groups[gi + 1][0])
                h = nxt.register_forward_hook(lambda m, a, o, calls=calls: calls.append(1))
            stats = ctx.collect_stats(group)
            if gi + 1 < len(groups):
                h.remove()
                later_calls[ctx.index, gi] = len(calls)
            got.update({(ctx.index, p): stats[p] for p in group})

    run_blockwise(model, calib, process, batch_size=2)
    for key, xtx in ref.items():
        torch.testing.assert_close(got[key].xtx, xtx, rtol=1e-4, atol=1e-3)
        assert got[key].n_rows == calib.numel()
    q, *rest = groups[0]
    assert rest and all(got[0, p] is got[0, q] for p in rest)  # q/k/v: one XᵀX
    for gi in range(len(groups) - 1):
        assert later_calls[0, gi] == 1  # block 0: the first pass runs whole, to learn the plan
        assert later_calls[1, gi] == 0  # block 1: every pass stops after the group's last linear
