"""Size of a (compressed) model: parameters, bytes and honest bits per parameter.

Bits count everything a compressed module stores (codes, scales, zero points, codebooks,
biases) at its stored dtype; the denominator is the parameter count of the dense layers
they replace. Tied tensors are counted once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ..compress.modules import CompressedModule


@dataclass
class Footprint:
    params: int  # nominal parameters (dense equivalent)
    bytes: int  # bytes held in memory by parameters and buffers (tied tensors once)
    compressed_params: int  # nominal parameters of the compressed modules
    compressed_bytes: int  # bytes those modules hold
    bits_per_param: float  # whole model
    compressed_bits_per_param: float  # compressed modules only (nan if none)

    def to_dict(self) -> dict:
        return asdict(self)


def footprint(model: nn.Module) -> Footprint:
    """Parameters, bytes in memory and bits per parameter of ``model``."""
    seen: set[int] = set()
    params = total_bits = 0
    comp_params = comp_bits = 0
    inside = set()
    for mod in model.modules():
        if not isinstance(mod, CompressedModule):
            continue
        bits = mod.storage_bits()
        comp_params += mod.nominal_params()
        comp_bits += bits
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            inside.add(t.data_ptr())
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.data_ptr()
        if ptr in seen or ptr in inside:
            continue
        seen.add(ptr)
        total_bits += t.numel() * t.element_size() * 8
        if isinstance(t, nn.Parameter):
            params += t.numel()
    params += comp_params
    total_bits += comp_bits
    return Footprint(
        params=params,
        bytes=total_bits // 8,
        compressed_params=comp_params,
        compressed_bytes=comp_bits // 8,
        bits_per_param=total_bits / max(params, 1),
        compressed_bits_per_param=comp_bits / comp_params if comp_params else float("nan"),
    )
