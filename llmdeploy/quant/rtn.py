"""Round-to-nearest (RTN) weight-only static quantization, group-wise, with mixed precision.

Each row of a weight matrix is cut into groups of ``group_size`` input columns; a group gets
one fp16 scale (and, asymmetric, one zero point), and every weight the nearest of the
``2**bits`` grid levels: ``q = clamp(round(w / s) + z, 0, 2**bits - 1)``, ``ŵ = (q - z)·s``.
Codes are packed (``bits`` bits each), so the memory saving is real. Only decoder-block
linears are quantized (embeddings and the head stay dense, as in GPTQ/AWQ's protocol).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..compress.base import Compressor, register_method
from ..compress.modules import CompressedModule, register_module
from ..errors import ConfigError
from ..models.adapters import get_adapter
from .packing import pack, unpack

log = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
# fp16 rounds to nearest with relative error <= 2**-11; growing the scale by 2**-10 before the
# cast guarantees the stored scale is never smaller than the exact one, so the grid still
# covers [min, max] of the group and the error bound |w - ŵ| <= s/2 holds for the stored s.
_SCALE_SLACK = 1.0 + 2.0**-10
_MIN_SCALE = 2.0**-14  # smallest normal fp16


def quantize_groupwise(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``w`` (out, in) group-wise. Returns codes (uint8, out×in), fp16 scales and
    uint8 zero points (out × in/group_size each)."""
    out_f, in_f = w.shape
    g = w.detach().to(torch.float32).reshape(out_f, in_f // group_size, group_size)
    qmax = 2**bits - 1
    if symmetric:
        absmax = g.abs().amax(-1)
        scale = 2 * absmax / qmax  # grid (q - 2^(b-1))·s spans [-absmax - s/2, absmax - s/2]
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        # The range always holds 0 (as in GPTQ), so the zero point is an integer in [0, qmax].
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = (hi - lo) / qmax
    scale = (scale * _SCALE_SLACK).clamp_min(_MIN_SCALE).to(torch.float16)
    s = scale.to(torch.float32)
    if not symmetric:
        zero = torch.round(-lo / s).clamp(0, qmax)
    q = torch.clamp(torch.round(g / s.unsqueeze(-1)) + zero.unsqueeze(-1), 0, qmax)
    return q.to(torch.uint8).reshape(out_f, in_f), scale, zero.to(torch.uint8)


def dequantize_groupwise(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    out_f, in_f = q.shape
    g = q.reshape(out_f, in_f // group_size, group_size).to(torch.float32)
    w = (g - zero.to(torch.float32).unsqueeze(-1)) * scale.to(torch.float32).unsqueeze(-1)
    return w.reshape(out_f, in_f).to(dtype)


@register_module
class RTNLinear(CompressedModule):
    """A linear whose weight is stored as packed ``bits``-bit codes with fp16 group scales."""

    fixed_dtype_buffers = ("qweight", "scales", "zeros")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        symmetric: bool = False,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        n_groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=torch.float16))
        if symmetric:
            self.register_buffer("zeros", None)
        else:
            self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, symmetric: bool) -> RTNLinear:
        mod = cls(linear.in_features, linear.out_features, bits, group_size, symmetric,
                  linear.bias is not None, dtype=linear.weight.dtype)
        q, scale, zero = quantize_groupwise(linear.weight, bits, group_size, symmetric)
        mod.qweight = pack(q, bits)
        mod.scales = scale
        if not symmetric:
            mod.zeros = zero
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.data)
        return mod.to(linear.weight.device)

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the module computes with, (out, in)."""
        zeros = self.zeros if self.zeros is not None else torch.full_like(
            self.scales, 2 ** (self.bits - 1), dtype=torch.uint8
        )
        return dequantize_groupwise(self.codes(), self.scales, zeros, self.group_size, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight, for code that reads ``.weight`` (shape and dtype of the original)."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return self.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def init_kwargs(self) -> dict[str, Any]:
        return dict(in_features=self.in_features, out_features=self.out_features, bits=self.bits,
                    group_size=self.group_size, symmetric=self.symmetric, bias=self.bias is not None)

    def nominal_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")


@register_method("rtn")
@dataclass
class RTN(Compressor):
    """Round-to-nearest weight-only quantization of every decoder-block linear.

    ``group_size=-1`` means one group per row (per-channel). ``overrides`` maps a regular
    expression (searched in the module's qualified name) to other bits — ``{"down_proj": 8}``
    — or to ``None`` (keep that linear dense), or to ``{"bits": ..., "group_size": ...}``;
    the first matching pattern wins.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    overrides: dict[str, Any] | None = field(default=None)

    def _settings(self, name: str) -> tuple[int, int] | None:
        for pattern, value in (self.overrides or {}).items():
            if re.search(pattern, name):
                if value is None:
                    return None
                if isinstance(value, dict):
                    return int(value.get("bits", self.bits)), int(value.get("group_size", self.group_size))
                return int(value), self.group_size
        return self.bits, self.group_size

    def plan(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """Which linears get which (bits, group size); raises ConfigError on impossible ones."""
        adapter = get_adapter(model)
        plan: dict[str, tuple[int, int]] = {}
        for name in adapter.linear_names():
            mod = model.get_submodule(name)
            if isinstance(mod, CompressedModule):
                continue  # already compressed by an earlier step
            settings = self._settings(name)
            if settings is None:
                continue
            bits, gs = settings
            if bits not in SUPPORTED_BITS:
                raise ConfigError(f"{name}: RTN supports bits in {SUPPORTED_BITS}, got {bits}")
            k = mod.in_features
            gs = k if gs in (-1, 0, None) else gs
            if gs <= 0 or k % gs:
                raise ConfigError(
                    f"{name}: group_size={gs} does not divide in_features={k}; choose a group size "
                    f"that divides every width (e.g. a power of two dividing {k}) or group_size=-1"
                )
            if k % 8:
                raise ConfigError(f"{name}: in_features={k} must be a multiple of 8 to pack codes")
            plan[name] = (bits, gs)
        return plan

    def validate(self, model: nn.Module) -> None:
        self.plan(model)

    def apply(self, model: nn.Module, calib: torch.Tensor | None = None) -> nn.Module:
        plan = self.plan(model)
        for name, (bits, gs) in tqdm(plan.items(), desc=f"RTN {self.bits}-bit", leave=False):
            lin = model.get_submodule(name)
            model.set_submodule(name, RTNLinear.from_linear(lin, bits, gs, self.symmetric))
        return model
