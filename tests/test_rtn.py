import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmdeploy
from llmdeploy.errors import ConfigError
from llmdeploy.quant import RTN, RTNLinear, pack, quantize_groupwise, unpack
from llmdeploy.quant.packing import _check

from .conftest import ids_for


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 4), groups=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_pack_roundtrip(bits, rows, groups, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, 8 * groups), generator=g, dtype=torch.int64)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, groups * bits)
    assert torch.equal(unpack(packed, bits, 8 * groups).long(), codes)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_fast_packing_layout_equals_generic_layout(bits):
    codes = torch.randint(0, 2**bits, (3, 64))
    c = codes.reshape(3, -1, 8).long()
    word = (c << (torch.arange(8) * bits)).sum(-1)
    generic = ((word.unsqueeze(-1) >> (torch.arange(bits) * 8)) & 0xFF).to(torch.uint8).reshape(3, -1)
    assert torch.equal(pack(codes, bits), generic)
    with pytest.raises(ValueError):
        _check(9, 8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [16, 64])
def test_error_bound_per_group(bits, symmetric, group_size):
    torch.manual_seed(bits * 10 + group_size)
    w = torch.randn(24, 128) * torch.rand(24, 1) * 3
    w[0, :group_size] += 5.0  # a one-sided group
    q, scale, zero = quantize_groupwise(w, bits, group_size, symmetric)
    assert q.max() <= 2**bits - 1
    lin = torch.nn.Linear(128, 24, bias=False)
    lin.weight.data = w
    mod = RTNLinear.from_linear(lin, bits, group_size, symmetric)
    w_hat = mod.dequantize()
    s = mod.scales.float().repeat_interleave(group_size, dim=1)
    err = (w - w_hat).abs()
    assert (err <= s / 2 * (1 + 1e-5) + 1e-7).all(), float((err - s / 2).max())
    # The stored scale is close to the ideal one (no needless loss of resolution).
    grp = w.reshape(24, -1, group_size)
    ideal = (2 * grp.abs().amax(-1) if symmetric else
             grp.amax(-1).clamp(min=0) - grp.amin(-1).clamp(max=0)) / (2**bits - 1)
    assert torch.allclose(mod.scales.float(), ideal, rtol=3e-3)


def test_forward_equals_dequantized_linear_and_bits_are_honest():
    lin = torch.nn.Linear(64, 32, bias=True)
    mod = RTNLinear.from_linear(lin, 4, 32, symmetric=False)
    x = torch.randn(5, 64)
    torch.testing.assert_close(mod(x), x @ mod.dequantize().T + lin.bias)
    # 4 bits per weight + (fp16 scale + uint8 zero) per 32 weights + fp32 bias
    expected = 32 * 64 * 4 + 32 * 2 * (16 + 8) + 32 * 32
    assert mod.storage_bits() == expected
    assert mod.nominal_params() == 32 * 64 + 32


def _rtn_relative_logit_error(bits):
    model, tok = llmdeploy.load("tiny-llama")
    ids = ids_for(tok)
    ref = model(ids).logits
    RTN(bits=bits, group_size=32)(model)
    adapter = llmdeploy.get_adapter(model)
    assert all(isinstance(model.get_submodule(n), RTNLinear) for n in adapter.linear_names())
    assert isinstance(model.lm_head, torch.nn.Linear)
    fp = llmdeploy.eval.footprint(model)
    assert math.isclose(fp.compressed_bits_per_param, bits + 24 / 32)
    assert llmdeploy.applied_recipe(model)[-1]["bits"] == bits
    return (model(ids).logits - ref).abs().mean().item() / ref.abs().mean().item()


def test_rtn_replaces_decoder_linears_and_error_shrinks_with_bits():
    errs = [_rtn_relative_logit_error(b) for b in (2, 3, 4, 8)]
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert errs[3] < 0.03


def test_mixed_precision_overrides():
    model, _ = llmdeploy.load("tiny-llama")
    RTN(bits=4, group_size=32, overrides={"down_proj": 8, r"layers\.0\.self_attn\.q_proj": None})(model)
    layers = model.model.layers
    assert layers[1].mlp.down_proj.bits == 8 and layers[1].mlp.up_proj.bits == 4
    assert isinstance(layers[0].self_attn.q_proj, torch.nn.Linear)
    assert isinstance(layers[1].self_attn.q_proj, RTNLinear)


def test_group_size_must_divide_width_checked_before_work():
    model, _ = llmdeploy.load("tiny-llama")  # hidden 64, intermediate 160
    with pytest.raises(ConfigError, match="group_size=64 does not divide in_features=160"):
        RTN(bits=4, group_size=64)(model)
    assert not any(isinstance(m, RTNLinear) for m in model.modules())  # nothing was touched
    with pytest.raises(ConfigError, match="bits"):
        RTN(bits=1)(model)


def test_per_channel_group():
    model, tok = llmdeploy.load("tiny-opt")
    RTN(bits=8, group_size=-1)(model)
    mod = model.model.decoder.layers[0].fc2
    assert mod.group_size == mod.in_features and mod.scales.shape == (mod.out_features, 1)


def test_dtype_cast_keeps_packed_storage():
    model, tok = llmdeploy.load("tiny-llama")
    RTN(bits=4, group_size=32)(model)
    model.to(torch.float64)
    mod = model.model.layers[0].mlp.up_proj
    assert mod.qweight.dtype == torch.uint8 and mod.scales.dtype == torch.float16
    assert model(ids_for(tok)).logits.dtype == torch.float64


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_on_a_compact_sparse_layer_keeps_the_mask_and_bounds_the_error(n, m, symmetric):
    """Sparse + quantized: pruned entries stay exactly zero, every kept value is within half a
    step of its group's grid, and the storage is the mask/indices plus codes and scales."""
    from llmdeploy.prune import SparseLinear
    from llmdeploy.prune.sparse_linear import SparseRTNLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        if m:
            groups = lin.weight.view(48, 16, 4)
            idx = groups.abs().topk(2, dim=-1).indices
            groups.copy_(torch.zeros_like(groups).scatter(-1, idx, groups.gather(-1, idx)))
        else:
            lin.weight.mul_(torch.rand_like(lin.weight) > 0.6)
    sparse = SparseLinear.from_linear(lin, n, m)
    q = sparse.quantized(bits=4, group_size=16, symmetric=symmetric)
    assert isinstance(q, SparseRTNLinear) and q.quantized(4, 16, symmetric) is None
    w, wq = sparse.dense_weight(), q.dense_weight()
    assert torch.all(wq[w == 0] == 0)
    kept, kept_q = sparse.kept_values(torch.float32).flatten(), q.kept_values(torch.float32).flatten()
    pad = (-kept.numel()) % 16
    scales = q.scales.float().flatten().repeat_interleave(16)[: kept.numel()]
    assert torch.all((kept - kept_q).abs() <= scales / 2 + 1e-6)
    assert pad >= 0 and torch.equal(q.bias, lin.bias)
    x = torch.randn(3, 64)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, wq, lin.bias))
    codes_bits = q.qvalues.numel() * 8
    meta_bits = (q.mask.numel() if q.mask is not None else q.indices.numel()) * 8
    extra = q.scales.numel() * 16 + (0 if symmetric else q.zeros.numel() * 8) + 48 * 32
    assert q.storage_bits() == codes_bits + meta_bits + extra
