"""Sparse matmul for pruned layers on CPU: the kept values and a bitmask, nothing else read.

A pruned layer (:class:`~llmdeploy.prune.SparseLinear`, bitmask or N:M) is repacked once into
:class:`SparseKernelWeights`: one bit per weight as 16-bit words per row, the kept values
row-major in fp32, and where each row's values start. ``csrc/sparse.c`` expands one word of the
mask and the next ``popcount`` kept values into 16 lanes (AVX-512 ``vexpandps``; with AVX2 a
table of ``vpermps`` permutations per byte) and multiplies:
the memory traffic is ``1 + 32·(1 − s)`` bits per weight against 32 for the dense matvec, which
is what decoding on a CPU pays for. An N:M layer (2:4) goes through the same kernel with a fixed
count per row: its 2-bit positions become the bitmask, its values are already the compressed
values. Up to :data:`MAX_KERNEL_ROWS` token rows; more rows (prefill) rebuild the dense weight in C
(one pass) and run one BLAS matmul.

:func:`sparse_matmul_reference` (the dense weight with zeros, then ``F.linear``) is what the tests
compare with.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import native, row_call_buffers

MAX_KERNEL_ROWS = 16
#: zeros after the kept values (never read as weights; the AVX2 expansion loads 8 floats at a time)
VALUE_PADDING = 8


@dataclass
class SparseKernelWeights:
    """A pruned weight in the C kernel's layout (built once per layer)."""

    mask: torch.Tensor  # (out, in / 16) int16 words: bit j of word c = input 16c + j is kept
    values: torch.Tensor  # (nnz,) fp32, row-major
    row_start: torch.Tensor  # (out + 1,) int64
    in_features: int
    out_features: int

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads per token (mask, values, row offsets)."""
        return sum(t.numel() * t.element_size() for t in (self.mask, self.values, self.row_start))


def _fn(symbol: str):
    return _fns().get(symbol)


def _fns() -> dict:
    return _fns_isa(native.current_isa())


@functools.cache
def _fns_isa(isa: str) -> dict:
    from .native import function
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sigs = {"sparse_simd": (),
            "sparse_bitmask_matmul": (p, p, p, p, p, p, i64, i64, i64, i32),
            "sparse_bitmask_dense": (p, p, p, p, i64, i64, i32),
            "evict_from_cache": (p, i64)}
    out = {}
    for name, args in sigs.items():
        fn = function("sparse", name, args, ctypes.c_int if name == "sparse_simd" else None)
        if fn is None:
            return {}
        out[name] = fn
    return out


def available() -> bool:
    """Whether the C kernel built on this machine."""
    return bool(_fns())


def simd() -> int:
    """The path of the current build: 512 (AVX-512 expand), 256 (AVX2 permutes), 0 (portable C), -1 (none built)."""
    fn = _fn("sparse_simd")
    return -1 if fn is None else fn()


def to_kernel_layout(keep: torch.Tensor, values: torch.Tensor) -> SparseKernelWeights:
    """From a boolean ``keep`` (out, in) and the kept ``values`` in row-major order."""
    out_f, in_f = keep.shape
    if in_f % 16:
        raise ValueError(f"the sparse kernel needs in_features divisible by 16, got {in_f}")
    bits = keep.reshape(out_f, in_f // 16, 16).to(torch.int32) << torch.arange(16, dtype=torch.int32)
    words = bits.sum(-1).to(torch.int32)
    mask = torch.where(words >= 2**15, words - 2**16, words).to(torch.int16).contiguous()
    counts = keep.sum(1)
    row_start = torch.zeros(out_f + 1, dtype=torch.int64)
    row_start[1:] = torch.cumsum(counts, 0)
    vals = values.detach().reshape(-1).to(torch.float32).contiguous()
    if vals.numel() != int(row_start[-1]):
        raise ValueError(f"{vals.numel()} values for {int(row_start[-1])} kept positions")
    # 8 padding floats: the AVX2 path loads 8 values wherever a byte of the mask starts
    return SparseKernelWeights(mask, torch.cat([vals, vals.new_zeros(VALUE_PADDING)]), row_start, in_f, out_f)


def dense_weight(w: SparseKernelWeights) -> torch.Tensor:
    """The dense fp32 weight (out, in) with the zeros put back (C, one pass)."""
    out = torch.empty(w.out_features, w.in_features, dtype=torch.float32)
    _fn("sparse_bitmask_dense")(w.mask.data_ptr(), w.values.data_ptr(), w.row_start.data_ptr(), out.data_ptr(),
                                w.in_features, w.out_features, torch.get_num_threads())
    return out


def sparse_matmul(x: torch.Tensor, w: SparseKernelWeights, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x · Wᵀ + bias`` for fp32 CPU ``x`` (..., in) with the pruned weight ``w``."""
    n_rows = x.numel() // w.in_features
    if n_rows > MAX_KERNEL_ROWS:
        return F.linear(x, dense_weight(w), bias)
    x, out, bias = row_call_buffers(x, bias, w.out_features)
    _fn("sparse_bitmask_matmul")(x.data_ptr(), w.mask.data_ptr(), w.values.data_ptr(), w.row_start.data_ptr(),
                                 None if bias is None else bias.data_ptr(), out.data_ptr(), n_rows,
                                 w.in_features, w.out_features, torch.get_num_threads())
    return out


def evict(*tensors: torch.Tensor) -> None:
    """Flush ``tensors`` out of every CPU cache level (x86 ``clflush``; elsewhere nothing)."""
    for t in tensors:
        _fn("evict_from_cache")(t.data_ptr(), t.numel() * t.element_size())


#: the dense matvec is chosen only when it measures this much faster: otherwise the sparse kernel,
#: which needs no dense copy of the weight (single timings of a small layer are noisy)
DENSE_MARGIN = 1.10


def faster_path(w: SparseKernelWeights, dense: torch.Tensor, rounds: int = 7) -> str:
    """``"sparse"`` or ``"dense"``: which of the kernel and a dense matvec over ``dense`` (the
    same weight with its zeros) is faster for one token on this machine. Both are timed on this
    layer, interleaved, median of ``rounds``, each call with its weights first evicted from the
    caches: in a model every layer's weights are read from memory once per token, and timings
    with warm caches favour the dense matvec of a small layer (measured on smollm2-135m at 50%:
    warm timings picked dense for every layer, and the model decoded 0.75x as fast as with the
    sparse kernel everywhere). Dense wins only by :data:`DENSE_MARGIN`."""
    import statistics
    import time

    x = torch.randn(1, w.in_features)
    times: dict[str, list[float]] = {"sparse": [], "dense": []}
    calls = {"sparse": (lambda: sparse_matmul(x, w), (w.mask, w.values, w.row_start)),
             "dense": (lambda: F.linear(x, dense), (dense,))}
    with torch.no_grad():
        for f, _ in calls.values():
            f()
        for _ in range(rounds):
            for k, (f, tensors) in calls.items():
                evict(*tensors)
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    sparse, dense_t = statistics.median(times["sparse"]), statistics.median(times["dense"])
    return "dense" if dense_t * DENSE_MARGIN < sparse else "sparse"


def sparse_matmul_reference(x: torch.Tensor, keep: torch.Tensor, values: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch: scatter the kept values into a dense weight, then ``F.linear``."""
    w = torch.zeros(keep.shape, dtype=x.dtype)
    w[keep] = values.reshape(-1).to(x.dtype)
    return F.linear(x, w, bias)
