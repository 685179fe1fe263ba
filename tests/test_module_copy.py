"""A compressed model deep-copies and pickles after its kernels have run.

The CPU kernels keep per-module caches derived from the storage (repacked layouts, plans holding raw
pointers and ctypes functions). They are not state: ``CompressedModule.derived_caches`` names them,
copies and pickles drop them, and the copy rebuilds its own on first use. A cache left off that
list breaks ``copy.deepcopy(model)`` (ctypes pointers do not pickle) or shares pointers between
copies; so every attribute a forward adds must be on it.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import llmdeploy
from llmdeploy.compress.modules import compressed_modules
from llmdeploy.models.adapters import get_adapter
from llmdeploy.prune import Magnitude
from llmdeploy.quant import RTN, DynamicInt8, EmbeddingRTN
from llmdeploy.quant.aqlm_linear import AQLMLinear, pack_codes
from tests.conftest import ids_for


def _aqlm_random(model, num_codebooks: int, nbits: int):
    """Every decoder linear as a seeded random-coded AQLM layer (2x8 takes the lookup-table kernel,
    1x16 the direct one)."""
    g = torch.Generator().manual_seed(0)
    for name in get_adapter(model).linear_names():
        lin = model.get_submodule(name)
        m = AQLMLinear(lin.in_features, lin.out_features, num_codebooks, nbits, 8, bias=lin.bias is not None)
        with torch.no_grad():
            m.codebooks.copy_(torch.randn(m.codebooks.shape, generator=g) * 0.05)
            m.scales.copy_(torch.rand(m.scales.shape, generator=g) + 0.5)
            m.codes.copy_(pack_codes(torch.randint(0, 2**nbits, m.codes.shape, generator=g), nbits))
        model.set_submodule(name, m)
    return model


CASES = {
    "rtn-w4": lambda m: RTN(bits=4, group_size=32)(m),
    "rtn-w3": lambda m: RTN(bits=3, group_size=32)(m),
    "rtn-w8": lambda m: RTN(bits=8, group_size=32)(m),
    "w8a8": lambda m: DynamicInt8()(m),
    "sparse-70": lambda m: Magnitude(sparsity=0.7)(m),
    "sparse-2of4": lambda m: Magnitude(pattern="2:4", sparsity=None)(m),
    "aqlm-2x8": lambda m: _aqlm_random(m, 2, 8),
    "aqlm-1x16": lambda m: _aqlm_random(m, 1, 16),
    "rtn-w4+int8-embedding": lambda m: EmbeddingRTN(bits=8)(RTN(bits=4, group_size=32)(m)),
}


@pytest.mark.parametrize("name", CASES)
def test_compressed_model_copies_and_pickles_after_its_kernels_ran(name):
    model, tok = llmdeploy.load("tiny-llama")
    model = CASES[name](model.eval())
    mods = compressed_modules(model)
    before = {n: set(m.__dict__) for n, m in mods.items()}
    ids = ids_for(tok, n=1, seq=40)
    with torch.no_grad():
        model(ids[:, :1])  # a decode-sized call: the row kernels and their plans
        ref = model(ids).logits  # a prefill-sized one
    added = {n: set(m.__dict__) - before[n] for n, m in mods.items()}
    assert any(added.values()), "no kernel cached anything: this test would check nothing"
    measured = {}  # public attributes a forward sets (``kernel_choice_``) are results: they are copied
    for n, m in mods.items():
        kept = {a for a in added[n] if a.endswith("_") and not a.startswith("_")}
        measured.update({(n, a): getattr(m, a) for a in kept})
        assert added[n] - kept <= set(m.derived_caches), (
            f"{type(m).__name__} keeps {sorted(added[n] - kept - set(m.derived_caches))} outside derived_caches")

    pickle.dumps(model)  # pickles (the same __getstate__ as deepcopy; checkpoints use safetensors)
    twin = copy.deepcopy(model)
    for n, m in compressed_modules(twin).items():
        assert not set(m.__dict__) & set(m.derived_caches)
        assert {a: getattr(m, a) for (k, a) in measured if k == n} == {a: v for (k, a), v in measured.items() if k == n}
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, ref)

    # the copy rebuilt caches of its own: changing its storage in place leaves the original as it was
    with torch.no_grad():
        for t in (*twin.parameters(), *twin.buffers()):
            if t.is_floating_point():
                t.mul_(0.5)
        torch.testing.assert_close(model(ids).logits, ref)
        assert not torch.allclose(twin(ids).logits, ref)
