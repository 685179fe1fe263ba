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

from ..compress.base import Compressor, Report, register_method, require_targets
from ..compress.engine import walk_blocks
from ..compress.modules import CompressedModule, register_module
from ..errors import ConfigError
from ..kernels import forced_reference as kernels_forced_reference
from ..kernels import quant as quant_kernel
from ..kernels import quant_triton
from ..kernels.opaque import opaque_forward
from ..kernels.quant import KernelWeights, to_kernel_layout
from ..models.adapters import get_adapter
from .packing import pack, unpack

log = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
# fp16 rounds to nearest with relative error <= 2**-11; growing the scale by 2**-10 before the
# cast guarantees the stored scale is never smaller than the exact one, so the grid still
# covers [min, max] of the group and the error bound |w - ŵ| <= s/2 holds for the stored s.
_SCALE_SLACK = 1.0 + 2.0**-10
_MIN_SCALE = 2.0**-14  # smallest normal fp16


# The clipping search (GPTQ reference's ``Quantizer(mse=True)``): shrink the range by 1 - i/100 for
# i < 80 and keep, per group, the grid with the smallest sum |w - ŵ|^2.4.
MSE_NORM, MSE_GRID, MSE_MAXSHRINK = 2.4, 100, 0.8


def _group_grid(g: torch.Tensor, bits: int, symmetric: bool,
                shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scale and float zero point of each group (last dim of ``g``), range scaled by ``shrink``."""
    qmax = 2**bits - 1
    if symmetric:
        absmax = g.abs().amax(-1) * shrink
        scale = 2 * absmax / qmax  # grid (q - 2^(b-1))·s spans [-absmax - s/2, absmax - s/2]
    else:
        # The range always holds 0 (as in GPTQ), so the zero point is an integer in [0, qmax].
        lo, hi = g.amin(-1).clamp(max=0) * shrink, g.amax(-1).clamp(min=0) * shrink
        scale = (hi - lo) / qmax
    scale = (scale * _SCALE_SLACK).clamp_min(_MIN_SCALE).to(torch.float16)
    if symmetric:
        zero = torch.full(scale.shape, float(2 ** (bits - 1)), device=g.device)
    else:
        zero = torch.round(-lo / scale.to(torch.float32)).clamp(0, qmax)
    return scale, zero


def _codes(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(g / scale.to(torch.float32).unsqueeze(-1)) + zero.unsqueeze(-1), 0, qmax)


def quantize_groupwise(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, mse: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``w`` (out, in) group-wise. Returns codes (uint8, out×in), fp16 scales and
    uint8 zero points (out × in/group_size each). The grid spans each group's [min, max] (with
    0), or with ``mse=True`` the shrunken range of smallest ``sum |w - ŵ|^2.4`` (the clipping
    search of the GPTQ reference's quantizer: 80 candidates, ranges 1.0 down to 0.21)."""
    out_f, in_f = w.shape
    g = w.detach().to(torch.float32).reshape(out_f, in_f // group_size, group_size)
    qmax = 2**bits - 1
    scale, zero = _group_grid(g, bits, symmetric)
    if mse:
        def error(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
            deq = (_codes(g, scale, zero, qmax) - zero.unsqueeze(-1)) * scale.to(torch.float32).unsqueeze(-1)
            return (deq - g).abs_().pow_(MSE_NORM).sum(-1)

        best = error(scale, zero)
        for i in range(1, int(MSE_MAXSHRINK * MSE_GRID)):
            s1, z1 = _group_grid(g, bits, symmetric, 1 - i / MSE_GRID)
            err = error(s1, z1)
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s1, scale), torch.where(better, z1, zero)
    q = _codes(g, scale, zero, qmax)
    return q.to(torch.uint8).reshape(out_f, in_f), scale, zero.to(torch.uint8)


def dequantize_groupwise(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    out_f, in_f = q.shape
    g = q.reshape(out_f, in_f // group_size, group_size).to(torch.float32)
    w = (g - zero.to(torch.float32).unsqueeze(-1)) * scale.to(torch.float32).unsqueeze(-1)
    return w.reshape(out_f, in_f).to(dtype)


class GroupCodes:
    """Storage shared by the modules that hold a matrix as RTN codes (buffers ``qweight``,
    ``scales``, ``zeros``; attributes ``bits``, ``group_size``, ``in_features``): the matrix
    (out, in), its unpacked codes, and its C-kernel layout."""

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the module computes with, (out, in)."""
        zeros = self.zeros if self.zeros is not None else torch.full_like(
            self.scales, 2 ** (self.bits - 1), dtype=torch.uint8
        )
        return dequantize_groupwise(self.codes(), self.scales, zeros, self.group_size, dtype)

    def kernel_weights(self) -> KernelWeights | None:
        """This layer in the C kernel's layout, repacked on first use and again only when the
        stored codes, scales or zero points change (the checkpoint layout stays the documented one);
        None when they are not on the CPU."""
        b = self._buffers  # not the attributes: nn.Module's __getattr__ costs a microsecond each
        q, s, z = b["qweight"], b["scales"], b.get("zeros")
        key = (q.data_ptr(), q._version, s.data_ptr(), s._version,
               None if z is None else (z.data_ptr(), z._version))
        cached = self.__dict__.get("_kernel_cache")
        if cached is None or cached[0] != key:
            if not (q.is_cpu and s.is_cpu):
                return None
            zeros = z if z is not None else torch.full_like(s, 2 ** (self.bits - 1))
            cached = (key, to_kernel_layout(self.codes(), s, zeros, self.bits, self.group_size))
            self._kernel_cache = cached
        return cached[1]

    def _kernel_ok(self) -> bool:
        """Whether the C kernel has a layout for this layer's codes (decided once)."""
        ok = getattr(self, "_kernel_layout_ok", None)
        if ok is None:
            ok = quant_kernel.choose_layout(self.bits, self.group_size) is not None and quant_kernel.available()
            self._kernel_layout_ok = ok
        return ok


@register_module
class RTNLinear(GroupCodes, CompressedModule):
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
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, symmetric: bool,
                    mse: bool = False) -> RTNLinear:
        mod = cls(linear.in_features, linear.out_features, bits, group_size, symmetric,
                  linear.bias is not None, dtype=linear.weight.dtype)
        q, scale, zero = quantize_groupwise(linear.weight, bits, group_size, symmetric, mse)
        mod.qweight = pack(q, bits)
        mod.scales = scale
        if not symmetric:
            mod.zeros = zero
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.data)
        return mod.to(linear.weight.device)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight, for code that reads ``.weight`` (shape and dtype of the original)."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return self.dequantize(dtype)

    def _needs_autograd(self, x: torch.Tensor) -> bool:
        """Whether this call must be differentiable (the kernels have no backward)."""
        if not torch.is_grad_enabled():
            return False
        bias = self._parameters.get("bias")
        return x.requires_grad or self._buffers["scales"].requires_grad or (bias is not None and bias.requires_grad)

    @opaque_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the decode path is called ~200 times per token: every check here is a cheap one
        if x.is_cpu and x.dtype is torch.float32 and self._kernel_ok() and not kernels_forced_reference() \
                and not self._needs_autograd(x):
            w = self.kernel_weights()
            if w is not None:
                return quant_kernel.wonly_matmul(x, w, self._parameters.get("bias"))
        if x.is_cuda and quant_triton.supports(self.bits) and not kernels_forced_reference() and \
                not self._needs_autograd(x):
            flat = x.reshape(-1, self.in_features)
            if flat.shape[0] <= quant_triton.GEMV_MAX_ROWS:
                y = quant_triton.wonly_gemv(flat, self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                            self.bias)
                return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            w = quant_triton.wonly_dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                              self.in_features)
            return F.linear(x, w.to(x.dtype), self.bias)
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def init_kwargs(self) -> dict[str, Any]:
        return dict(in_features=self.in_features, out_features=self.out_features, bits=self.bits,
                    group_size=self.group_size, symmetric=self.symmetric, bias=self.bias is not None)

    def nominal_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")


@dataclass
class QuantReport(Report):
    """Which linears were quantized with which (bits, group size), and which were skipped and why."""

    quantized: dict[str, list[int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        s = f"{len(self.quantized)} linears quantized"
        return s + (f", {len(self.skipped)} skipped" if self.skipped else "")


@register_method("rtn")
@dataclass(kw_only=True)
class RTN(Compressor):
    """Round-to-nearest weight-only quantization of every decoder-block linear.

    ``group_size=-1`` means one group per row (per-channel). ``overrides`` maps a key to other
    bits — ``{"role:mlp_out": 8}`` — or to ``None`` (keep those linears dense), or to
    ``{"bits": ..., "group_size": ...}``; the first matching key wins. A key ``"role:R"`` selects
    the linears of role R (``attn_in``, ``attn_out``, ``mlp_in``, ``mlp_out``; the adapter knows
    them for every family); any other key is a regular expression searched in the qualified name.
    ``mse=True`` searches each group's clipping range (:func:`quantize_groupwise`) instead of
    spanning its [min, max]: a data-free variant, same storage.

    Pruned layers stored compactly (:class:`~llmdeploy.prune.SparseLinear`) are quantized in
    their own format: the kept values get ``bits``-bit codes in groups of ``group_size``
    consecutive kept values and the mask stays (sparse + quantized, as SparseGPT reports it).
    Layers already quantized are skipped; a step that would quantize nothing is an error.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    mse: bool = False
    overrides: dict[str, Any] | None = field(default=None)
    streamable = True
    supports_distributed = True

    def _settings(self, name: str, role: str) -> tuple[int, int] | None:
        for key, value in (self.overrides or {}).items():
            hit = key == f"role:{role}" if key.startswith("role:") else re.search(key, name)
            if hit:
                if value is None:
                    return None
                if isinstance(value, dict):
                    return int(value.get("bits", self.bits)), int(value.get("group_size", self.group_size))
                return int(value), self.group_size
        return self.bits, self.group_size

    def plan(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """Which linears get which (bits, group size); raises ConfigError on impossible ones and
        when nothing would be quantized (naming what was skipped and why)."""
        return self._plan(model)[0]

    def _plan(self, model: nn.Module) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
        adapter = get_adapter(model)
        roles = {s.path: s.role for s in adapter.linear_specs}
        for key in self.overrides or {}:
            if key.startswith("role:") and key[5:] not in set(roles.values()):
                raise ConfigError(f"rtn: override {key!r} names no role; roles are "
                                  f"{', '.join(sorted(set(roles.values())))}")
        plan: dict[str, tuple[int, int]] = {}
        skipped: dict[str, str] = {}
        for i, block in enumerate(adapter.blocks()):
            for path, mod in adapter.block_linears(block).items():
                name = f"{adapter.blocks_path}.{i}.{path}"
                settings = self._settings(name, roles[path])
                if settings is None:
                    skipped[name] = "overrides keep them dense"
                    continue
                bits, gs = settings
                if bits not in SUPPORTED_BITS:
                    raise ConfigError(f"{name}: RTN supports bits in {SUPPORTED_BITS}, got {bits}")
                if isinstance(mod, CompressedModule):
                    if not mod.quantizable:
                        skipped[name] = f"they are already quantized ({type(mod).__name__})"
                        continue
                    if gs in (-1, 0, None):
                        raise ConfigError(f"{name}: a sparse layer is quantized in groups of kept values; "
                                          "give a positive group_size")
                    if self.mse:
                        raise ConfigError(f"{name}: rtn's mse clipping search applies to dense linears, not to "
                                          f"{type(mod).__name__}; quantize with mse=False")
                    plan[name] = (bits, gs)
                    continue
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
        require_targets("rtn", plan, skipped)
        return plan, skipped

    def validate(self, model: nn.Module) -> None:
        self.plan(model)

    def apply(self, model: nn.Module, calib: torch.Tensor | None = None) -> nn.Module:
        plan, skipped = self._plan(model)
        self.report_ = QuantReport(quantized={n: list(v) for n, v in plan.items()}, skipped=skipped)
        paths = [spec.path for spec in get_adapter(model).linear_specs]

        def quantize_block(_i: int, prefix: str, block: nn.Module) -> None:
            for path in paths:
                if f"{prefix}.{path}" not in plan:
                    continue
                bits, gs = plan[f"{prefix}.{path}"]
                lin = block.get_submodule(path)
                new = lin.quantized(bits, gs, self.symmetric) if isinstance(lin, CompressedModule) else \
                    RTNLinear.from_linear(lin, bits, gs, self.symmetric, self.mse)
                block.set_submodule(path, new)

        walk_blocks(model, quantize_block, desc=f"RTN {self.bits}-bit")
        return model
