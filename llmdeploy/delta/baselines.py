"""Baselines for BitDelta at (about) the same size: a low-rank delta and round-to-nearest of the
delta. Both use the base's tensors outside the decoder linears, as BitDelta does.

- :class:`LowRankDelta`: ``Δ ≈ U_r S_r V_rᵀ`` (truncated SVD), factors stored in fp16, the rank
  per matrix chosen so that its bytes do not exceed BitDelta's (``out·in/8`` bytes of signs + a
  2-byte scale): ``r = floor((out·in/8 + 2) / (2·(out + in)))``.
- :class:`RTNDelta`: asymmetric min-max round-to-nearest of ``Δ`` in groups of ``group_size``
  along the input, ``bits`` per value plus an fp16 scale and zero per group (1 bit with groups of
  128 is 1.25 bits per weight, a quarter more than BitDelta's).

The compute form here is the reconstructed dense delta (these rows measure quality and size, not
speed); ``storage_bytes`` counts the compact form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..compress.base import Compressor, Report, engine_field, register_method
from ..errors import ConfigError
from ..models.adapters import get_adapter
from .bitdelta import shallow_clone


class DenseDeltaLinear(nn.Module):
    """``base(x) + x · Δᵀ`` with the base linear shared and ``storage_bytes`` of Δ's compact form."""

    def __init__(self, base: nn.Linear, delta: torch.Tensor, storage_bytes: int):
        super().__init__()
        self._base = (base,)
        self.register_buffer("delta", delta)
        self.storage_bytes = storage_bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._base[0](x) + torch.nn.functional.linear(x, self.delta.to(x.dtype))


@dataclass
class DeltaBaselineReport(Report):
    layers: int = 0
    delta_bytes: int = 0
    fp16_bytes: int = 0

    def summary(self) -> str:
        return (f"{self.layers} linears, {self.delta_bytes / 2**20:.2f} MiB of delta "
                f"({self.fp16_bytes / max(1, self.delta_bytes):.1f}x smaller than fp16 linears)")


class _DeltaBaseline(Compressor):
    base: nn.Module | None

    def validate(self, model: nn.Module) -> None:
        if self.base is None:
            raise ConfigError(f"{type(self).__name__} needs base=<the base model the fine-tune started from>")
        if get_adapter(model).linear_names() != get_adapter(self.base).linear_names():
            raise ConfigError(f"{type(self).__name__}: the fine-tune and the base have different decoder linears")

    def approximate(self, delta: torch.Tensor) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def apply(self, model: nn.Module, calib: torch.Tensor | None) -> nn.Module:
        out = shallow_clone(self.base)
        report = self.report_ = DeltaBaselineReport()
        for name in get_adapter(model).linear_names():
            base = self.base.get_submodule(name)
            delta = model.get_submodule(name).weight.detach().float() - base.weight.detach().float()
            approx, nbytes = self.approximate(delta)
            out.set_submodule(name, DenseDeltaLinear(base, approx.to(base.weight.dtype), nbytes))
            report.layers += 1
            report.delta_bytes += nbytes
            report.fp16_bytes += 2 * delta.numel()
        return out


@register_method("lowrank_delta")
@dataclass(kw_only=True)
class LowRankDelta(_DeltaBaseline):
    """Truncated-SVD delta at BitDelta's byte budget (or a fixed ``rank``)."""

    rank: int | None = None
    base: nn.Module | None = engine_field(None)

    def approximate(self, delta: torch.Tensor) -> tuple[torch.Tensor, int]:
        out_f, in_f = delta.shape
        r = self.rank or max(1, (out_f * in_f // 8 + 2) // (2 * (out_f + in_f)))
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        A = (U[:, :r] * S[:r]).half().float()
        B = Vh[:r].half().float()
        return A @ B, 2 * r * (out_f + in_f)


@register_method("rtn_delta")
@dataclass(kw_only=True)
class RTNDelta(_DeltaBaseline):
    """Round-to-nearest of the delta, ``bits`` per value in groups of ``group_size`` inputs."""

    bits: int = 1
    group_size: int = 128
    base: nn.Module | None = engine_field(None)

    def approximate(self, delta: torch.Tensor) -> tuple[torch.Tensor, int]:
        out_f, in_f = delta.shape
        g = self.group_size if in_f % self.group_size == 0 else in_f
        d = delta.reshape(out_f, in_f // g, g)
        lo, hi = d.amin(-1, keepdim=True), d.amax(-1, keepdim=True)
        qmax = (1 << self.bits) - 1
        scale = ((hi - lo) / qmax).clamp_min(1e-12).half().float()
        lo = lo.half().float()
        q = torch.round((d - lo) / scale).clamp(0, qmax)
        groups = out_f * in_f // g
        return (q * scale + lo).reshape(out_f, in_f), (out_f * in_f * self.bits + 7) // 8 + 4 * groups
