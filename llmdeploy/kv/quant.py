"""KV-cache quantization: asymmetric min-max integers, per token or per channel.

Per token (``axis="token"``): one scale and zero point per (token, head) over the head dimension,
so a token is quantized once, when it is written. Per channel (``axis="channel"``): one scale and
zero point per (block, head, channel) over the block's tokens — the layout KIVI (Liu et al., 2024)
recommends for keys, whose outliers sit in fixed channels. A per-channel block can only be
quantized once it is full, so the block being filled is kept in full precision until then (KIVI's
residual; transformers' ``QuantizedCache`` keeps one the same way). 4-bit codes are packed two per
byte along the head dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

AXES = ("token", "channel")


@dataclass(frozen=True)
class KVQuantConfig:
    """How the cache stores keys and values: ``bits`` 8 or 4, an axis for each."""

    bits: int = 8
    key_axis: str = "token"
    value_axis: str = "token"

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ConfigError(f"KV quantization supports bits=8 or bits=4, got {self.bits!r}")
        for name in ("key_axis", "value_axis"):
            if getattr(self, name) not in AXES:
                raise ConfigError(f"{name} must be one of {AXES}, got {getattr(self, name)!r}")

    @property
    def label(self) -> str:
        return f"int{self.bits}-k{self.key_axis}-v{self.value_axis}"


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (uint8, packed for 4 bits along the last dim), scale and zero of ``x``, reduced over
    ``dim`` (``-1`` = per token over the head dimension, ``-2`` = per channel over tokens)."""
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    q = torch.round((x - lo) / scale).clamp_(0, qmax).to(torch.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, scale.float(), lo.float()


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize` (up to rounding)."""
    if bits == 4:
        q = torch.stack((q & 0xF, q >> 4), dim=-1).flatten(-2)
    return (q.float() * scale + zero).to(dtype)
