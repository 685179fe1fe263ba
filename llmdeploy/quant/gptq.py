"""GPTQ (Frantar et al., ICLR 2023): one-shot weight quantization with second-order error feedback.

For a linear with weight W and calibration inputs X, GPTQ minimises ‖(W − Ŵ)X‖² over Ŵ on the
RTN grid. It walks the columns (inputs) in order; when column i is rounded, the rounding error is
spread over the columns not yet processed through the inverse Hessian H⁻¹ = (XᵀX + λI)⁻¹, using
its upper Cholesky factor U (``Uᵀ U = H⁻¹``): ``W[:, i:] −= (w_i − q_i)/U_ii · U[i, i:]``, with
lazy batched updates every ``blocksize`` columns. λ = ``percdamp`` · mean diag(XᵀX).

Grid: exactly RTN's (:func:`~llmdeploy.quant.rtn.quantize_groupwise`): per group of ``group_size``
consecutive input columns one fp16 scale and a zero point, computed — as in the reference — from
the *updated* weights when the walk reaches the group's first column. ``act_order=True`` walks
the columns by decreasing Hessian diagonal (the reference's ``desc_act``); the groups stay the
consecutive columns of the original order with their parameters computed up front from the
original weights ("static groups", as AutoGPTQ's ``static_groups``), so the stored layer is the
same packed :class:`~llmdeploy.quant.RTNLinear` as RTN's (same storage, same bits per parameter,
no permutation index), and everything that handles RTN handles GPTQ.

``mse=True`` (off by default, as in the reference) computes each grid by the reference
quantizer's clipping search (:func:`~llmdeploy.quant.rtn.quantize_groupwise`: the range shrunk
to minimise ``sum |w - ŵ|^2.4`` over the group) instead of spanning the group's [min, max].

``true_sequential`` (default, the reference's): within a block, the linears are quantized group
by group in computation order (attention inputs, attention output, MLP inputs, MLP output), each
group's statistics collected with the earlier groups already quantized. Columns whose input is
always zero ("dead") get weight 0, as in the reference.

Fixed from the reference code (IST-DASLab ``gptq.py``): it computes a group's grid from the global
weight matrix, whose columns inside the current lazy block have not yet received that block's
updates — stale values whenever ``group_size < blocksize`` (e.g. groups of 32 or 64 with the
default block of 128). Here a group's grid is computed from its columns as updated so far.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..compress.base import Compressor, engine_field, register_method, require_targets
from ..compress.distributed import gather_rows, my_rows, world
from ..compress.engine import BlockContext, run_blockwise
from ..compress.hessian import inverse_hessian_factor
from ..compress.modules import CompressedModule
from ..errors import ConfigError, TrainingDivergedError
from ..kernels import gptq as gptq_kernel
from ..models.adapters import get_adapter
from .packing import pack
from .rtn import SUPPORTED_BITS, QuantReport, RTNLinear, dequantize_groupwise, quantize_groupwise

log = logging.getLogger(__name__)


def _grid(w: torch.Tensor, bits: int, symmetric: bool, mse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN's scale (fp16 stored, returned as fp32) and zero point of each row of ``w`` (out, g)."""
    _, scale, zero = quantize_groupwise(w, bits, w.shape[1], symmetric, mse)
    return scale.float().squeeze(1), zero.float().squeeze(1)


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, qmax)


def _walk_order(xtx: torch.Tensor, act_order: bool) -> torch.Tensor:
    """The order GPTQ walks the columns in: decreasing diag(XᵀX) with ``act_order``, else natural."""
    if act_order:
        return torch.argsort(xtx.diagonal(), descending=True)
    return torch.arange(xtx.shape[0], device=xtx.device)


def gptq_hinv(xtx: torch.Tensor, act_order: bool = False, percdamp: float = 0.01) -> torch.Tensor:
    """The upper Cholesky factor of the damped inverse Hessian in GPTQ's walk order (fp32)."""
    perm = _walk_order(xtx, act_order)
    return inverse_hessian_factor(xtx.to(torch.float32)[perm][:, perm], percdamp).to(torch.float32)


def gptq_quantize(weight: torch.Tensor, xtx: torch.Tensor, bits: int, group_size: int, *,
                  symmetric: bool = False, act_order: bool = False, percdamp: float = 0.01,
                  blocksize: int = 128, hinv: torch.Tensor | None = None, mse: bool = False,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` (out, in) given ``xtx = XᵀX`` of its inputs. Returns RTN's storage:
    codes (uint8, out × in), fp16 scales and uint8 zero points (out × in/group_size). ``hinv``
    may pass :func:`gptq_hinv` of the same ``xtx`` (linears fed the same inputs share it)."""
    device = xtx.device
    W = weight.detach().to(device=device, dtype=torch.float32).clone()
    rows, cols = W.shape
    gs = cols if group_size in (-1, 0, None) else group_size
    if cols % gs:
        raise ConfigError(f"gptq: group_size={gs} does not divide in_features={cols}")
    qmax = 2**bits - 1
    H = xtx.to(torch.float32).clone()
    dead = H.diagonal() == 0
    W[:, dead] = 0.0
    n_groups = cols // gs
    scales = torch.zeros(rows, n_groups, device=device)
    zeros = torch.zeros(rows, n_groups, device=device)
    if act_order:  # static groups: every group's grid from the original weights, before any update
        _, s0, z0 = quantize_groupwise(W, bits, gs, symmetric, mse)
        scales, zeros = s0.float(), z0.float()
    perm = _walk_order(H, act_order)
    W = W[:, perm]
    U = gptq_hinv(H, act_order, percdamp) if hinv is None else hinv.to(device=device, dtype=torch.float32)
    group_of = perm // gs  # the (original) group of each column in walk order
    Q = torch.zeros_like(W)
    use_c = gptq_kernel.usable(W, U.contiguous(), scales, zeros)  # the column walk in C: bitwise the loop below
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2].contiguous()
        i = 0
        while i < i2 - i1:  # segments of columns sharing a grid: a group (or the block, act_order)
            col = i1 + i
            if not act_order and col % gs == 0:  # the group's grid from the weights as updated so far
                g = int(group_of[col])
                cur = W1[:, i:i + gs]
                need = gs - cur.shape[1]
                if need > 0:  # columns past this lazy block: add the updates still pending from it
                    cur = torch.cat([cur, W[:, i2:i2 + need] - Err1[:, :i] @ U[i1:i1 + i, i2:i2 + need]], dim=1)
                scales[:, g], zeros[:, g] = _grid(cur, bits, symmetric, mse)
            end = i2 - i1 if act_order else min(i2 - i1, (col // gs + 1) * gs - i1)
            if use_c and W1.is_contiguous():
                gptq_kernel.gptq_columns(W1, Q1, Err1, U1, i, end, scales, zeros, group_of[i1 + i:i1 + end], qmax)
                i = end
                continue
            for j in range(i, end):
                g = int(group_of[i1 + j])
                w = W1[:, j]
                q = (_round(w, scales[:, g], zeros[:, g], qmax) - zeros[:, g]) * scales[:, g]
                Q1[:, j] = q
                err = (w - q) / U1[j, j]
                W1[:, j:] -= err.unsqueeze(1) * U1[j, j:].unsqueeze(0)
                Err1[:, j] = err
            i = end
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if not torch.isfinite(Q).all():
        raise TrainingDivergedError("GPTQ produced non-finite weights; raise percdamp")
    inv = torch.argsort(perm)
    Q = Q[:, inv]
    s = scales.repeat_interleave(gs, dim=1)
    z = zeros.repeat_interleave(gs, dim=1)
    codes = _round(Q, s, z, qmax)  # Q lies on the grid: this recovers its codes exactly
    return codes.to(torch.uint8).cpu(), scales.to(torch.float16).cpu(), zeros.to(torch.uint8).cpu()


def gptq_quantize_shared(weight: torch.Tensor, xtx: torch.Tensor, bits: int, group_size: int,
                         **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`gptq_quantize` with the output rows shared among the processes of a distributed run
    (rows are independent given XᵀX: each process quantizes a contiguous slice, the codes, scales
    and zero points are gathered). Alone: the plain call."""
    if world()[1] == 1:
        return gptq_quantize(weight, xtx, bits, group_size, **kwargs)
    lo, hi = my_rows(weight.shape[0])
    if hi == lo:  # more processes than rows: this one has nothing to quantize
        cols = weight.shape[1]
        groups = 1 if group_size in (-1, 0, None) else cols // group_size
        parts = (torch.zeros(0, cols, dtype=torch.uint8), torch.zeros(0, groups, dtype=torch.float16),
                 torch.zeros(0, groups, dtype=torch.uint8))
    else:
        parts = gptq_quantize(weight[lo:hi], xtx, bits, group_size, **kwargs)
    return tuple(gather_rows(t, weight.shape[0]) for t in parts)  # type: ignore[return-value]


def layer_error(weight: torch.Tensor, approx: torch.Tensor, xtx: torch.Tensor) -> float:
    """``‖(W − Ŵ)X‖² = tr((W − Ŵ) XᵀX (W − Ŵ)ᵀ)``: the layer-wise objective GPTQ minimises
    (products in fp32, the sum in fp64: a report; within 1e-8 relative of fp64 products on
    correlated test layers of widths 128–1536)."""
    d = (weight.detach().float() - approx.detach().float()).to(xtx.device)
    return float(((d @ xtx.float()) * d).sum(dtype=torch.float64))


@dataclass
class GPTQReport(QuantReport):
    """Per linear: the layer-wise error ‖(W − Ŵ)X‖² of GPTQ and of RTN at the same grid settings."""

    error: dict[str, float] = field(default_factory=dict)
    rtn_error: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        s = super().summary()
        if self.error:
            ratio = sum(self.error.values()) / max(sum(self.rtn_error.values()), 1e-30)
            s += f"; layer error {ratio:.3f}x RTN's (summed over linears)"
        return s


@register_method("gptq")
@dataclass(kw_only=True)
class GPTQ(Compressor):
    """GPTQ weight-only quantization of every dense decoder-block linear (needs calibration data).

    ``group_size=-1``: one group per row. The result is RTN's packed layer (:class:`RTNLinear`)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    act_order: bool = False
    percdamp: float = 0.01
    mse: bool = False
    true_sequential: bool = True
    blocksize: int = 128
    device: str | None = engine_field(None)
    batch_size: int = engine_field(8)
    needs_calibration = True
    streamable = True
    supports_distributed = True

    def _targets(self, model: nn.Module) -> tuple[list[str], dict[str, str]]:
        adapter = get_adapter(model)
        names, skipped = [], {}
        for name in adapter.linear_names():
            mod = model.get_submodule(name)
            if isinstance(mod, CompressedModule):
                skipped[name] = f"they are already compressed ({type(mod).__name__}); GPTQ needs dense linears"
                continue
            k = mod.in_features
            gs = k if self.group_size in (-1, 0, None) else self.group_size
            if gs <= 0 or k % gs:
                raise ConfigError(f"{name}: group_size={gs} does not divide in_features={k}; choose a group "
                                  f"size that divides every width (e.g. a power of two dividing {k}) or -1")
            if k % 8:
                raise ConfigError(f"{name}: in_features={k} must be a multiple of 8 to pack codes")
            names.append(name)
        require_targets("gptq", names, skipped)
        return names, skipped

    def validate(self, model: nn.Module) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"gptq: bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if not self.percdamp > 0:
            raise ConfigError(f"gptq: percdamp must be > 0 (the Hessian may be singular), got {self.percdamp}")
        if self.blocksize < 1 or self.batch_size < 1:
            raise ConfigError("gptq: blocksize and batch_size must be >= 1")
        self._targets(model)

    def apply(self, model: nn.Module, calib: torch.Tensor | None) -> nn.Module:
        names, skipped = self._targets(model)
        report = GPTQReport(skipped=skipped)
        self.report_ = report
        wanted = set(names)

        def process(ctx: BlockContext) -> None:
            groups = ctx.adapter.linear_groups(ctx.block)
            groups = [[p for p in g if f"{ctx.name}.{p}" in wanted] for g in groups]
            groups = [g for g in groups if g]
            if not self.true_sequential:
                groups = [[p for g in groups for p in g]]
            rank, size = world()
            for group in groups:
                stats = ctx.collect_stats(group)
                hinvs: dict[int, torch.Tensor] = {}  # linears fed the same inputs share XᵀX and its factor
                errors = torch.zeros(2, len(group), dtype=torch.float64)
                for k, path in enumerate(group):
                    lin = ctx.block.get_submodule(path)
                    xtx = stats[path].xtx
                    if id(xtx) not in hinvs:
                        hinvs[id(xtx)] = gptq_hinv(xtx, self.act_order, self.percdamp)
                    codes, scales, zeros = gptq_quantize_shared(
                        lin.weight, xtx, self.bits, self.group_size, symmetric=self.symmetric,
                        act_order=self.act_order, percdamp=self.percdamp, blocksize=self.blocksize,
                        hinv=hinvs[id(xtx)], mse=self.mse)
                    gs = lin.in_features if self.group_size in (-1, 0, None) else self.group_size
                    new = RTNLinear(lin.in_features, lin.out_features, self.bits, gs, self.symmetric,
                                    lin.bias is not None, dtype=lin.weight.dtype)
                    new.qweight, new.scales = pack(codes, self.bits), scales
                    if not self.symmetric:
                        new.zeros = zeros
                    if lin.bias is not None:
                        new.bias.data.copy_(lin.bias.data)
                    if k % size == rank:  # the report's errors: each process computes its share
                        q_rtn, s_rtn, z_rtn = quantize_groupwise(lin.weight, self.bits, gs, self.symmetric, self.mse)
                        rtn_w = dequantize_groupwise(q_rtn, s_rtn, z_rtn, gs, torch.float32)
                        errors[0, k] = layer_error(lin.weight, new.dequantize(), xtx)
                        errors[1, k] = layer_error(lin.weight, rtn_w, xtx)
                    report.quantized[f"{ctx.name}.{path}"] = [self.bits, gs]
                    ctx.block.set_submodule(path, new.to(lin.weight.device))
                ctx.reduce(errors)
                for k, path in enumerate(group):
                    report.error[f"{ctx.name}.{path}"] = float(errors[0, k])
                    report.rtn_error[f"{ctx.name}.{path}"] = float(errors[1, k])

        run_blockwise(model, calib, process, device=self.device, batch_size=self.batch_size, desc="GPTQ",
                      key=self.to_dict(), report=report)
        log.info("gptq: %s", report.summary())
        return model
