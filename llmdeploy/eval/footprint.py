"""Size of a (compressed) model: parameters, bytes and honest bits per parameter.

Bits count everything a compressed module stores (codes, scales, zero points, codebooks,
biases) at its stored dtype; the denominator is the parameter count of the dense layers
they replace. Tied tensors are counted once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from ..compress.modules import compressed_modules


@dataclass
class Footprint:
    params: int  # nominal parameters (dense equivalent)
    bytes: int  # bytes of the state dict in memory (tied tensors once)
    compressed_params: int  # nominal parameters of the compressed modules
    compressed_bytes: int  # bytes those modules hold
    bits_per_param: float  # whole model
    compressed_bits_per_param: float  # compressed modules only (nan if none)
    disk_bytes: int | None = None  # size of the safetensors file a save writes (if measured)

    def to_dict(self) -> dict:
        return asdict(self)


def disk_bytes(model: nn.Module) -> int:
    """Bytes of the safetensors file that :func:`llmdeploy.save` writes for ``model``."""
    import tempfile

    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        save_model(model, str(path))
        return path.stat().st_size


def footprint(model: nn.Module, *, disk: bool = False) -> Footprint:
    """Parameters, bytes in memory and bits per parameter of ``model``.

    With ``disk=True`` the model's weights are also written to a temporary safetensors file to
    measure their size on disk.
    """
    seen: set[int] = set()
    params = total_bits = 0
    comp_params = comp_bits = 0
    prefixes = []
    for name, mod in compressed_modules(model).items():
        comp_params += mod.nominal_params()
        comp_bits += mod.storage_bits()
        prefixes.append(name + ".")
    # What a checkpoint holds: the state dict (non-persistent buffers such as rotary tables are
    # recomputed, not stored), tied tensors once.
    for key, t in model.state_dict(keep_vars=True).items():
        if any(key.startswith(p) for p in prefixes):
            continue
        ptr = t.data_ptr()
        if ptr in seen:
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
        disk_bytes=disk_bytes(model) if disk else None,
    )
