"""RTN/GPTQ models exported in the compressed-tensors format load through transformers + the
compressed-tensors package and compute our logits."""

import pytest
import torch

import llmdeploy
from llmdeploy.errors import ConfigError
from llmdeploy.io import save_compressed_tensors
from llmdeploy.quant import GPTQ, RTN, DynamicInt8

from .conftest import ids_for

pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("name,make", [
    ("tiny-llama", lambda m, tok: RTN(bits=4, group_size=32, symmetric=True)(m)),
    ("tiny-qwen2", lambda m, tok: RTN(bits=3, group_size=-1, symmetric=True,
                                      overrides={"role:mlp_out": 8})(m)),  # tied head, per channel, mixed
    ("tiny-llama", lambda m, tok: GPTQ(bits=4, group_size=16, act_order=True, symmetric=True)(
        m, ids_for(tok, n=8, seq=32))),
])
def test_export_loads_in_transformers_with_our_logits(tmp_path, name, make):
    from transformers import AutoModelForCausalLM
    model, tok = llmdeploy.load(name)
    model = make(model.eval(), tok)
    path = save_compressed_tensors(model, tok, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = ids_for(tok, n=2, seq=16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits,gs,symmetric", [(4, 32, False), (3, 16, False), (8, 64, True), (2, 64, False)])
def test_exported_tensors_equal_the_packages_own_compressor(bits, gs, symmetric):
    """Byte for byte what compressed-tensors' PackedQuantizationCompressor writes for the same
    quantized weight — asymmetric zero points included (which transformers 5.24 + compressed-tensors
    0.20.1 cannot load back: its loader expects them unpacked, its decompressor packed)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from llmdeploy.io.compressed_tensors import _module_tensors
    from llmdeploy.quant import RTNLinear
    mod = RTNLinear.from_linear(torch.nn.Linear(64, 33, bias=False), bits, gs, symmetric)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="channel" if gs == 64 else "group", group_size=None if gs == 64 else gs)
    state = {"weight": mod.dequantize(), "weight_scale": mod.scales.float()}
    if not symmetric:
        state["weight_zero_point"] = (mod.zeros.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    theirs = PackedQuantizationCompressor.compress(state, QuantizationScheme(targets=["Linear"], weights=args))
    ours = _module_tensors(mod)
    for key in ("weight_packed", "weight_shape") + (() if symmetric else ("weight_zero_point",)):
        assert torch.equal(ours[key], theirs[key]), key
    assert ("weight_zero_point" in ours) == (not symmetric)


def test_export_refuses_what_it_cannot_express(tmp_path):
    model, tok = llmdeploy.load("tiny-llama")
    with pytest.raises(ConfigError, match="no RTN/GPTQ layers"):
        save_compressed_tensors(model, tok, tmp_path / "dense")
    mixed = llmdeploy.Compose([RTN(bits=4, group_size=32, overrides={"role:mlp_out": None}), DynamicInt8()])(model)
    with pytest.raises(ConfigError, match="does not express"):
        save_compressed_tensors(mixed, tok, tmp_path / "mixed")
