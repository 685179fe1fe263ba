"""W8A8 dynamic int8 linear on CPU: an exact int8 x int8 product (``csrc/w8a8.c``), AVX512-VNNI or AVX2.

The activations are quantized per row as the torch reference does (symmetric, ``round(x / s)``,
``s = max|x| / 127``), made unsigned by adding 128 for ``vpdpbusd`` (64 byte products per
instruction, int32 accumulation), and ``128 · Σ_i w[o, i]`` is subtracted; every fp32 step matches
the reference, so outputs are bit-identical to :class:`~llmdeploy.quant.DynamicInt8Linear`'s torch
path. Without VNNI, AVX2 multiplies int16-widened operands with ``vpmaddwd`` (exact as well); for
1-3 rows it reads a copy of the weight repacked once into blocks of 8 outputs (:func:`pack_blocks`),
one sequential stream instead of 8 rows. Used only where the compiled kernel has one of these
(else torch's path is faster than scalar C).

A layer prepares its weight once (:func:`prepare`: row sums, the packed copy, the resolved C
function and pointers) and calls :func:`apply` per forward: the decode path is called ~200 times
per token, and resolving them per call cost about 5 µs, as much as the kernel itself on an
8x576 layer.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from . import native, row_call_buffers


def _fn(symbol: str):
    return _fn_isa(symbol, native.current_isa())


@functools.cache
def _fn_isa(symbol: str, isa: str):
    from .native import function
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sig = {"w8a8_linear": ((p, p, p, p, p, p, p, i64, i64, i64, i32), ctypes.c_int),
           "w8a8_row_sums": ((p, p, i64, i64), None),
           "w8a8_pack_blocks": ((p, p, i64, i64), None),
           "w8a8_has_vnni": ((), ctypes.c_int),
           "w8a8_simd": ((), ctypes.c_int)}[symbol]
    return function("w8a8", symbol, *sig)


#: without VNNI, inputs of more rows than this (prefill) take torch's exact fp32-GEMM path, which
#: measured faster there than int16 products (a 512-token prefill was slower than dense through the kernel)
AVX2_MAX_ROWS = 16


def simd() -> int:
    """The product path of the current build: 2 (AVX512-VNNI), 1 (AVX2), 0 (portable C), -1 (none built)."""
    return _simd(native.current_isa())


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


def pack_blocks(qweight: torch.Tensor) -> torch.Tensor | None:
    """The weight in the AVX2 decode layout (blocks of 8 outputs, zero-padded; ``csrc/w8a8.c``), or
    None where this build's path does not read it (VNNI, portable C). Built once per layer: the
    layer keeps its row-major ``qweight`` (the checkpoint) beside it."""
    if simd() != 1:
        return None
    w = qweight.contiguous()
    n_out, k = w.shape
    out = torch.empty(-(-n_out // 8) * -(-k // 16) * 128, dtype=torch.int8)
    _fn("w8a8_pack_blocks")(w.data_ptr(), out.data_ptr(), n_out, k)
    return out


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, wsum: torch.Tensor,
                bias: torch.Tensor | None = None, packed: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic W8A8 ``x · (q_w·s_w)ᵀ + bias`` for fp32 CPU ``x`` (..., in); ``wsum`` from :func:`row_sums`,
    ``packed`` from :func:`pack_blocks` (optional: the same result, read faster for 1-3 rows). A
    layer calls :func:`apply` with its :func:`prepare`-d weight instead."""
    return apply(x, W8A8Weights(qweight.contiguous(), wscale.float().contiguous(), wsum, packed), bias)


@dataclass
class W8A8Weights:
    """A layer's weight as the kernel reads it, with everything a call passes resolved once."""

    qweight: torch.Tensor  # (out, in) int8, contiguous
    wscale: torch.Tensor  # (out,) fp32
    wsum: torch.Tensor  # (out,) int32, see row_sums
    packed: torch.Tensor | None  # see pack_blocks

    def __post_init__(self) -> None:
        self.out_features, self.in_features = self.qweight.shape
        self._fn = _fn("w8a8_linear")
        self._ptrs = (self.qweight.data_ptr(), None if self.packed is None else self.packed.data_ptr(),
                      self.wscale.data_ptr(), self.wsum.data_ptr())


def prepare(qweight: torch.Tensor, wscale: torch.Tensor) -> W8A8Weights:
    """What :func:`apply` needs for this weight (row sums and the packed copy computed here, once)."""
    w = qweight.contiguous()
    return W8A8Weights(w, wscale.float().contiguous(), row_sums(w), pack_blocks(w))


def apply(x: torch.Tensor, w: W8A8Weights, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`w8a8_linear` with a prepared weight (the layer's per-call path)."""
    x, out, bias = row_call_buffers(x, bias, w.out_features)
    rc = w._fn(x.data_ptr(), *w._ptrs, None if bias is None else bias.data_ptr(), out.data_ptr(),
               x.numel() // w.in_features, w.in_features, w.out_features, torch.get_num_threads())
    if rc != 0:
        raise MemoryError("the W8A8 kernel could not allocate its quantized activations")
    return out
