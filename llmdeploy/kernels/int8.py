"""W8A8 dynamic int8 linear on CPU: an exact int8 x int8 product (``csrc/w8a8.c``), AVX512-VNNI or AVX2.

The activations are quantized per row as the torch reference does (symmetric, ``round(x / s)``,
``s = max|x| / 127``), made unsigned by adding 128 for ``vpdpbusd`` (64 byte products per
instruction, int32 accumulation), and ``128 · Σ_i w[o, i]`` is subtracted; every fp32 step matches
the reference, so outputs are bit-identical to :class:`~llmdeploy.quant.DynamicInt8Linear`'s torch
path. Without VNNI, AVX2 multiplies int16-widened operands with ``vpmaddwd`` (exact as well). Used
only where the compiled kernel has one of these (else torch's path is faster than scalar C).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import row_call_buffers


def _fn(symbol: str):
    from .native import current_isa
    return _fn_isa(symbol, current_isa())


@functools.cache
def _fn_isa(symbol: str, isa: str):
    from .native import function
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sig = {"w8a8_linear": ((p, p, p, p, p, p, i64, i64, i64, i32), ctypes.c_int),
           "w8a8_row_sums": ((p, p, i64, i64), None),
           "w8a8_has_vnni": ((), ctypes.c_int),
           "w8a8_simd": ((), ctypes.c_int)}[symbol]
    return function("w8a8", symbol, *sig)


#: without VNNI, inputs of more rows than this (prefill) take torch's exact fp32-GEMM path, which
#: measured faster there than int16 products (a 512-token prefill was slower than dense through the kernel)
AVX2_MAX_ROWS = 16


def simd() -> int:
    """The product path of the current build: 2 (AVX512-VNNI), 1 (AVX2), 0 (portable C), -1 (none built)."""
    from .native import _ISA
    return _simd(_ISA)


@functools.cache
def _simd(isa: str) -> int:
    fn = _fn_isa("w8a8_simd", isa)
    return -1 if fn is None else fn()


def available() -> bool:
    """Whether the C kernel built here with a SIMD product (AVX512-VNNI or AVX2)."""
    return simd() >= 1


def serves(rows: int) -> bool:
    """Whether the kernel is the faster path for an input of ``rows`` token rows here."""
    s = simd()
    return s == 2 or (s == 1 and rows <= AVX2_MAX_ROWS)


def row_sums(qweight: torch.Tensor) -> torch.Tensor:
    """``Σ_i w[o, i]`` per output (int32): what undoes the +128 shift of the activations."""
    w = qweight.contiguous()
    out = torch.empty(w.shape[0], dtype=torch.int32)
    _fn("w8a8_row_sums")(w.data_ptr(), out.data_ptr(), w.shape[0], w.shape[1])
    return out


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, wsum: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic W8A8 ``x · (q_w·s_w)ᵀ + bias`` for fp32 CPU ``x`` (..., in); ``wsum`` from :func:`row_sums`."""
    k = qweight.shape[1]
    x, out, bias = row_call_buffers(x, bias, qweight.shape[0])
    rc = _fn("w8a8_linear")(x.data_ptr(), qweight.data_ptr(), wscale.data_ptr(), wsum.data_ptr(),
                            None if bias is None else bias.data_ptr(), out.data_ptr(), x.numel() // k, k,
                            qweight.shape[0], torch.get_num_threads())
    if rc != 0:
        raise MemoryError("the W8A8 kernel could not allocate its quantized activations")
    return out
