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
