"""Compressed models under torch.compile: each compressed module enters the traced graph as one
opaque operator (``llmdeploy::module_call``), with no graph break, and the compiled model computes
what the eager one does."""

import copy
import gc

import pytest
import torch

import llmdeploy
from llmdeploy.errors import ConfigError
from llmdeploy.eval.speed import _decode_compiled
from llmdeploy.kernels import opaque
from llmdeploy.prune import Magnitude
from llmdeploy.quant import AQLM, RTN, DynamicInt8, EmbeddingRTN

from .conftest import ids_for

FORMATS = {
    "rtn-4bit + int8 embedding/head": lambda: llmdeploy.Compose([RTN(bits=4, group_size=32), EmbeddingRTN(bits=8)]),
    "w8a8": lambda: DynamicInt8(),
    "sparse 2:4": lambda: Magnitude(sparsity=None, pattern="2:4"),
    "aqlm 2x4": lambda: AQLM(num_codebooks=2, nbits_per_codebook=4, in_group_size=8, max_iter=1, steps_per_round=2,
                             kmeans_iters=4, finetune_blocks=False),
}


@pytest.fixture(scope="module")
def tiny():
    model, tok = llmdeploy.load("tiny-llama")
    return model.eval(), ids_for(tok, n=4, seq=16)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_compressed_modules_are_one_opaque_operator_each(tiny, fmt, monkeypatch):
    dense, calib = tiny
    model = FORMATS[fmt]()(copy.deepcopy(dense), calib).eval()
    ids = calib[:2]
    calls = []
    real = opaque._module_call
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits
        explained = torch._dynamo.explain(model)(input_ids=ids, use_cache=False)
        assert explained.graph_break_count == 0
        ops = [n for g in explained.graphs for n in g.graph.nodes if n.target is torch.ops.llmdeploy.module_call.default]
        assert ops  # the compressed modules are in the graph as operators
        torch._dynamo.reset()
        # count the operator's calls at run time: one per compressed module
        monkeypatch.setattr(opaque, "_module_call", lambda *a: calls.append(a[1]) or real(*a))
        try:
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids, use_cache=False).logits
        finally:
            torch._dynamo.reset()
    assert len(set(calls)) == len(ops) and len(calls) == len(ops)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_compiled_greedy_decode_equals_eager_over_a_static_cache(tiny):
    dense, calib = tiny
    model = RTN(bits=4, group_size=32)(copy.deepcopy(dense), calib).eval()
    prompt = calib[:1, :8]
    want = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 8:]
    got: list = []
    steps = _decode_compiled(model, prompt, 6, backend="aot_eager", tokens=got)
    torch._dynamo.reset()
    assert len(steps) == 6 and got == [want.tolist()]


def test_copies_get_their_own_handle_and_a_dead_module_is_a_clear_error(tiny):
    dense, calib = tiny
    model = RTN(bits=4, group_size=32)(copy.deepcopy(dense), calib)
    layer = model.model.layers[0].mlp.down_proj
    twin = copy.deepcopy(layer)
    assert twin._opaque_handle != layer._opaque_handle
    x = torch.randn(1, 3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(opaque.module_call(x, twin._opaque_handle, twin.out_features), layer(x))
    handle = twin._opaque_handle
    del twin
    gc.collect()
    with pytest.raises(ConfigError, match="no longer exists"):
        opaque.module_call(x, handle, layer.out_features)
