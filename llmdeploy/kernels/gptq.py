"""GPTQ's column walk in C (``csrc/gptq.c``): the per-column loop of one lazy block, row-parallel.

The torch loop in :func:`llmdeploy.quant.gptq.gptq_quantize` issues ~10 small tensor operations per
column, so its cost is mostly per-operation overhead. The C walk does the same float operations in
the same order, row by row — bitwise equal to the torch loop (tested) — and its cost scales with
the rows; ``python -m benchmarks.gptq_walk`` times both on SmolLM2's layer shapes. Used on CPU fp32 tensors when the
kernel builds (see :mod:`.native`); :func:`~llmdeploy.kernels.use_reference` forces the torch loop.
"""

from __future__ import annotations

import ctypes

import torch

from . import forced_reference
from .native import function


def _fn():
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    return function("gptq", "gptq_columns", (p, p, p, p, i64, i64, i64, i64, p, p, i64, p, ctypes.c_float,
                                             ctypes.c_int), None)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the C walk applies to these tensors (CPU, fp32, contiguous) and is built here."""
    if forced_reference():
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        return False
    return _fn() is not None


def gptq_columns(W1: torch.Tensor, Q1: torch.Tensor, E1: torch.Tensor, U1: torch.Tensor, a: int, b: int,
                 scales: torch.Tensor, zeros: torch.Tensor, group_of: torch.Tensor, qmax: int) -> None:
    """Columns ``[a, b)`` of the block ``W1`` (rows, nb) in place: their quantized values into
    ``Q1``, their scaled errors into ``E1``, the later columns of ``W1`` updated. ``scales`` and
    ``zeros`` are (rows, groups) fp32; ``group_of[j - a]`` is column j's group (int64)."""
    rows, nb = W1.shape
    group_of = group_of.to(torch.int64).contiguous()
    _fn()(W1.data_ptr(), Q1.data_ptr(), E1.data_ptr(), U1.data_ptr(), rows, nb, a, b, scales.data_ptr(),
          zeros.data_ptr(), scales.shape[1], group_of.data_ptr(), float(qmax), torch.get_num_threads())
