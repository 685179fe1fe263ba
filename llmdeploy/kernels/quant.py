"""Weight-only quantized matmul (RTN/GPTQ layers: codes of 1..8 bits, fp16 group scales, zero points).

The checkpoint keeps its documented layout (codes packed along the input dimension, see
:mod:`llmdeploy.quant.packing`). On the first CPU forward a layer is repacked once into a C
kernel layout (:class:`KernelWeights`, blocks of 8 outputs that share every load of ``x``) and its
scales and zero points are widened to fp32 (``csrc/qmatmul.c``). Up to :data:`MAX_KERNEL_ROWS`
token rows (decoding):

- ``nibble`` (1- to 4-bit codes, groups of a multiple of 32): one code per nibble. With AVX-512,
  per output and group a 16-entry table ``(code − z)·s`` and ``vpermps`` (which reads only an
  index's low 4 bits) turn 16 codes into 16 weights, then one FMA; with AVX2 (no 16-entry
  permute) nibbles are widened to floats, a dot product per group, then ``s·(Σ c·x − z·Σ x)``.
  Codes of 1-3 bits take 4 bits in this layout (more memory than the checkpoint), which is faster
  than their bit planes (on an AVX-512 CPU, 2-bit planes measured slower than 4-bit nibbles);
- ``byte`` (8-bit codes): bytes widened to floats, a dot product per group, then
  ``s·(Σ c·x − z·Σ x)``;
- ``planes`` (any width, groups of a multiple of 16): one bit plane per code bit; two bytes of a
  plane are the AVX-512 lane mask of 16 inputs (AVX2: the word broadcast, each lane testing its
  bit), so ``Σ code·x = Σ_k 2^k·(masked sum of plane k)``.

Each has an AVX-512, an AVX2+FMA and a portable C path (:func:`simd` says which one this build
has; :func:`llmdeploy.kernels.native.isa` builds another, which is how the tests reach all three).

More rows (prefill): the C kernel writes the dense fp32 weight (bit-identical to the reference's
dequantization) and one BLAS matmul follows: one dequantization per call.

:func:`wonly_matmul_reference` (dequantize in torch, then ``F.linear``) is what the layers computed
before and what the tests compare with.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import row_call_buffers
from .binary import pack_signs

#: decode-sized inputs take the row kernels; above this many rows, dequantize once + BLAS
#: (smollm2's 576x1536 layers on 2 cores: the crossover is between 16 and 32 rows, see benchmarks.speed)
MAX_KERNEL_ROWS = 16




@dataclass
class KernelWeights:
    """A quantized weight in one of the C kernel's layouts (built once per layer)."""

    layout: str  # "nibble" (3-4 bits), "byte" (8 bits) or "planes" (any width)
    data: torch.Tensor  # uint8, blocks of 8 outputs (see csrc/qmatmul.c)
    scales: torch.Tensor  # (out, groups) fp32
    zeros: torch.Tensor  # (out, groups) fp32
    bits: int
    group_size: int
    in_features: int
    out_features: int

    def __post_init__(self) -> None:  # what every call passes, resolved once
        self._ptrs = (self.data.data_ptr(), self.scales.data_ptr(), self.zeros.data_ptr())
        self._fn = _fn(f"qmatmul_{self.layout}")
        self._tail = (self.bits, self.group_size) if self.layout == "planes" else (self.group_size,)


def choose_layout(bits: int, group_size: int) -> str | None:
    """The fastest layout the kernel has for these codes, or None (the reference only)."""
    if bits <= 4 and group_size % 32 == 0:
        return "nibble"
    if bits == 8 and group_size % 16 == 0:
        return "byte"
    if group_size % 16 == 0:
        return "planes"
    return None


def _blocks(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) -> (ceil(out / 8), 8, in) with zero rows padding the last block."""
    pad = (-codes.shape[0]) % 8
    return torch.nn.functional.pad(codes.to(torch.uint8), (0, 0, 0, pad)).reshape(-1, 8, codes.shape[1])


def to_kernel_layout(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                     layout: str | None = None) -> KernelWeights:
    """Repack unsigned ``codes`` (out, in) of ``bits`` bits with group ``scales``/``zeros`` (out,
    groups) into ``layout`` (default: :func:`choose_layout`)."""
    out_f, in_f = codes.shape
    layout = layout or choose_layout(bits, group_size)
    need = {"nibble": 32, "byte": 16, "planes": 16}.get(layout or "", 0)
    if not need or group_size % need or in_f % group_size or (layout == "nibble" and bits > 4) or \
            (layout == "byte" and bits != 8):
        raise ValueError(f"no {layout} kernel layout for {bits}-bit codes in groups of {group_size} "
                         f"(in_features={in_f})")
    ng, b = in_f // group_size, _blocks(codes)
    if layout == "nibble":  # byte j of a 32-input chunk: input j (low nibble), input 16 + j (high)
        c = b.reshape(-1, 8, ng, group_size // 32, 2, 16)
        data = (c[..., 0, :] | (c[..., 1, :] << 4)).permute(0, 2, 3, 1, 4)
    elif layout == "byte":
        data = b.reshape(-1, 8, ng, group_size // 16, 16).permute(0, 2, 3, 1, 4)
    else:
        shifts = torch.arange(bits, dtype=torch.uint8).reshape(1, 1, 1, bits, 1)
        bitsets = (b.reshape(-1, 8, ng, 1, group_size) >> shifts) & 1  # (blocks, 8, groups, bits, gs)
        planes = pack_signs((bitsets.to(torch.int8) * 2 - 1).reshape(-1, group_size).float())
        data = planes.reshape(-1, 8, ng, bits, group_size // 16, 2).permute(0, 2, 3, 4, 1, 5)
    return KernelWeights(layout, data.contiguous(), scales.float().reshape(out_f, ng).contiguous(),
                         zeros.float().reshape(out_f, ng).contiguous(), bits, group_size, in_f, out_f)


def _fn(symbol: str):
    from .native import current_isa
    return _fn_isa(symbol, current_isa())


@functools.cache
def _fn_isa(symbol: str, isa: str):
    from .native import function
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sig = {"qmatmul_simd": ((), ctypes.c_int),
           "qmatmul_planes": ((p, p, p, p, p, p, i64, i64, i64, i32, i64, i32), ctypes.c_int),
           "dequant_planes": ((p, p, p, p, i64, i64, i32, i64, i32), None),
           "qmatmul_nibble": ((p, p, p, p, p, p, i64, i64, i64, i64, i32), ctypes.c_int),
           "qmatmul_byte": ((p, p, p, p, p, p, i64, i64, i64, i64, i32), ctypes.c_int),
           "dequant_nibble": ((p, p, p, p, i64, i64, i64, i32), None),
           "dequant_byte": ((p, p, p, p, i64, i64, i64, i32), None)}[symbol]
    return function("qmatmul", symbol, *sig)


def available() -> bool:
    """Whether the C kernel built on this machine (a C compiler is present, ``LLMDEPLOY_NATIVE`` is not 0)."""
    return _fn("qmatmul_planes") is not None


def simd() -> int:
    """The SIMD path of the current build: 512 (AVX-512), 256 (AVX2+FMA), 0 (portable C), -1 (none built)."""
    fn = _fn("qmatmul_simd")
    return -1 if fn is None else fn()


def dequantize_kernel_weights(w: KernelWeights) -> torch.Tensor:
    """The dense fp32 weight (out, in) of ``w`` (C kernel; bit-identical to the reference's)."""
    out = torch.empty(w.out_features, w.in_features, dtype=torch.float32)
    ptrs = (w.data.data_ptr(), w.scales.data_ptr(), w.zeros.data_ptr(), out.data_ptr(), w.in_features,
            w.out_features)
    threads = torch.get_num_threads()
    if w.layout == "planes":
        _fn("dequant_planes")(*ptrs, w.bits, w.group_size, threads)
    else:
        _fn(f"dequant_{w.layout}")(*ptrs, w.group_size, threads)
    return out


def wonly_matmul(x: torch.Tensor, w: KernelWeights, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x · Ŵᵀ + bias`` for fp32 CPU ``x`` (..., in) with the quantized weight ``w``."""
    n_rows = x.numel() // w.in_features
    if n_rows > MAX_KERNEL_ROWS:
        return F.linear(x, dequantize_kernel_weights(w), bias)
    x, out, bias = row_call_buffers(x, bias, w.out_features)
    rc = w._fn(x.data_ptr(), *w._ptrs, None if bias is None else bias.data_ptr(), out.data_ptr(), n_rows,
               w.in_features, w.out_features, *w._tail, torch.get_num_threads())
    if rc != 0:
        raise MemoryError("the quantized matmul kernel could not allocate its buffers")
    return out


def wonly_matmul_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch: dequantize ``(codes − zeros)·scales`` per group, then ``F.linear``."""
    out_f, in_f = codes.shape
    g = codes.reshape(out_f, in_f // group_size, group_size).float()
    weight = ((g - zeros.float()[..., None]) * scales.float()[..., None]).reshape(out_f, in_f)
    return F.linear(x, weight.to(x.dtype), bias)
