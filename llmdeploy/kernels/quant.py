"""Weight-only quantized matmul (RTN/GPTQ layers: codes of 1..8 bits, fp16 group scales, zero points).

The checkpoint keeps its documented layout (codes packed along the input dimension, see
:mod:`llmdeploy.quant.packing`). On the first CPU forward a layer is repacked once into the C
kernel's layout, :class:`PlaneWeights` — one bit plane per code bit, in words of 16 inputs, the
words of 8 outputs side by side (groups of a multiple of 16 inputs) — and the scales and zero points are widened to fp32. Then (``csrc/qmatmul.c``):

- up to :data:`MAX_KERNEL_ROWS` token rows (decoding): each output is ``Σ_g s_g·(Σ_k 2^k·m_{g,k} −
  z_g·Σ_{i∈g} x_i)`` where ``m_{g,k}`` is the sum of the inputs whose code has bit ``k`` set; two
  bytes of a plane are the AVX-512 lane mask of 16 inputs, so the kernel reads ``bits`` bits per
  weight instead of 32 and does ``bits/16`` masked adds per weight;
- more rows (prefill): the C kernel writes the dense fp32 weight (bit-exact with the reference's
  dequantization) and one BLAS matmul follows, so prefill costs one dequantization per call.

:func:`wonly_matmul_reference` (dequantize in torch, then ``F.linear``) is what the layers computed
before and what the tests compare with.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .binary import pack_signs

#: decode-sized inputs take the plane kernel; above this many rows, dequantize once + BLAS
#: (smollm2's 576x1536 layers on 2 cores: the crossover is between 16 and 32 rows, see benchmarks.speed)
MAX_KERNEL_ROWS = 16


@dataclass
class PlaneWeights:
    """A quantized weight in the C kernel's layout (built once per layer)."""

    planes: torch.Tensor  # (ceil(out / 8), groups, bits, group_size / 16, 8, 2) uint8
    scales: torch.Tensor  # (out, groups) fp32
    zeros: torch.Tensor  # (out, groups) fp32
    bits: int
    group_size: int
    in_features: int
    out_features: int


def to_planes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
              ) -> PlaneWeights:
    """Repack unsigned ``codes`` (out, in) of ``bits`` bits with group ``scales``/``zeros`` (out, groups)."""
    out_f, in_f = codes.shape
    if group_size % 16 or in_f % group_size:
        raise ValueError(f"group_size={group_size} must be a multiple of 16 dividing in_features={in_f}")
    ng, nc, pad = in_f // group_size, group_size // 16, (-out_f) % 8
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, 0, 0, pad)).reshape(-1, 8, ng, 1, group_size)
    shifts = torch.arange(bits, dtype=torch.uint8).reshape(1, 1, 1, bits, 1)
    bitsets = (c >> shifts) & 1  # (out blocks, 8, groups, bits, group_size)
    planes = pack_signs((bitsets.to(torch.int8) * 2 - 1).reshape(-1, group_size).float())
    planes = planes.reshape(-1, 8, ng, bits, nc, 2).permute(0, 2, 3, 4, 1, 5)
    return PlaneWeights(planes.contiguous(),
                        scales.float().reshape(out_f, ng).contiguous(), zeros.float().reshape(out_f, ng).contiguous(),
                        bits, group_size, in_f, out_f)


@functools.cache
def _fn(symbol: str):
    from .native import function
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    if symbol == "qmatmul_planes":
        return function("qmatmul", symbol, (p, p, p, p, p, p, i64, i64, i64, i32, i64, i32), ctypes.c_int)
    return function("qmatmul", symbol, (p, p, p, p, i64, i64, i32, i64, i32), None)


def available() -> bool:
    """Whether the C kernel built on this machine (a C compiler is present, ``LLMDEPLOY_NATIVE`` is not 0)."""
    return _fn("qmatmul_planes") is not None


def supports(x: torch.Tensor, group_size: int) -> bool:
    """Whether the C kernel takes this input: fp32 on CPU, groups of a multiple of 16, built here."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and group_size % 16 == 0 and available()


def dequantize_planes(w: PlaneWeights) -> torch.Tensor:
    """The dense fp32 weight (out, in) of ``w`` (C kernel)."""
    out = torch.empty(w.out_features, w.in_features, dtype=torch.float32)
    _fn("dequant_planes")(w.planes.data_ptr(), w.scales.data_ptr(), w.zeros.data_ptr(), out.data_ptr(),
                          w.in_features, w.out_features, w.bits, w.group_size, torch.get_num_threads())
    return out


def wonly_matmul(x: torch.Tensor, w: PlaneWeights, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x · Ŵᵀ + bias`` for fp32 CPU ``x`` (..., in) with the quantized weight ``w``."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, w.in_features)
    if flat.shape[0] > MAX_KERNEL_ROWS:
        return F.linear(x, dequantize_planes(w), bias)
    flat = flat.contiguous()
    out = torch.empty(flat.shape[0], w.out_features, dtype=torch.float32)
    b = bias.detach().float().contiguous() if bias is not None else None
    rc = _fn("qmatmul_planes")(flat.data_ptr(), w.planes.data_ptr(), w.scales.data_ptr(), w.zeros.data_ptr(),
                               b.data_ptr() if b is not None else None, out.data_ptr(), flat.shape[0],
                               w.in_features, w.out_features, w.bits, w.group_size, torch.get_num_threads())
    if rc != 0:
        raise MemoryError("the quantized matmul kernel could not allocate its group sums")
    return out.reshape(*lead, w.out_features)


def wonly_matmul_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch: dequantize ``(codes − zeros)·scales`` per group, then ``F.linear``."""
    out_f, in_f = codes.shape
    g = codes.reshape(out_f, in_f // group_size, group_size).float()
    weight = ((g - zeros.float()[..., None]) * scales.float()[..., None]).reshape(out_f, in_f)
    return F.linear(x, weight.to(x.dtype), bias)
