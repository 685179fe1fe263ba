"""A dense fp32 linear for a few token rows on CPU that reads the weight once (``csrc/rows.c``).

Decoding one token multiplies by each weight once (BLAS's matrix-vector product, memory-bound).
Verifying a tree of drafted tokens multiplies 2..16 rows, and there BLAS switches to its GEMM
path, which for so few rows can cost several times one row (``python -m benchmarks.speed --part
rows`` measures both): verification stops being almost free, which is what speculative decoding
relies on. :func:`linear_rows` streams each weight row once for all token rows.

Each output is one sum in a fixed order, independent of the number of rows and of where the
row falls: a node of a verified tree gets exactly the projections it would get alone (BLAS's
rounding changes with the number of rows). :func:`few_row_linears` routes a model's
``nn.Linear`` layers through it for inputs of at most :data:`MAX_ROWS` rows, for the duration of
a ``with`` block.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from . import forced_reference, native

#: inputs with more token rows than this go to BLAS (prefill). With weights streaming from memory
#: the row kernel beats BLAS's GEMM up to about 48 rows on smollm2's shapes (``python -m
#: benchmarks.speed --part rows``): a batch of 4 rows verifying trees of up to 11 nodes stays here.
MAX_ROWS = 48
#: the row limit of the innermost active :func:`few_row_linears` block (0: none), for :func:`linear`
_ROUTING: contextvars.ContextVar[int] = contextvars.ContextVar("llmdeploy_row_routing", default=0)


def _fn(symbol: str):
    return _fn_isa(symbol, native.current_isa())


@functools.cache
def _fn_isa(symbol: str, isa: str):
    from .native import function
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    sig = {"rows_simd": ((), ctypes.c_int), "linear_rows": ((p, p, p, p, i64, i64, i64, ctypes.c_int), None)}[symbol]
    return function("rows", symbol, *sig)


def available() -> bool:
    """Whether the C kernel built on this machine."""
    return _fn("linear_rows") is not None


def simd() -> int:
    """The path of the current build: 512 (AVX-512), 256 (AVX2+FMA), 0 (portable C), -1 (none built)."""
    fn = _fn("rows_simd")
    return -1 if fn is None else fn()


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x · weightᵀ + bias`` with ``x`` (..., in), ``weight`` (out, in): the C kernel for fp32 CPU
    tensors when it is built, else ``F.linear``. Not differentiable (inference)."""
    fn = _fn("linear_rows")
    if fn is None or not all(t is None or (t.dtype is torch.float32 and t.is_cpu) for t in (x, weight, bias)):
        return F.linear(x, weight, bias)
    n_out, n_in = weight.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"x has {x.shape[-1]} features, the weight takes {n_in}")
    return _call(fn, x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
                 x.numel() // n_in)


def _call(fn, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, rows: int) -> torch.Tensor:
    """The C call on contiguous fp32 CPU tensors (x (..., in) of ``rows`` rows, w (out, in))."""
    n_out, n_in = w.shape
    out = torch.empty((*x.shape[:-1], n_out), dtype=torch.float32)
    fn(x.data_ptr(), w.data_ptr(), None if b is None else b.data_ptr(), out.data_ptr(), rows, n_in, n_out,
       torch.get_num_threads())
    return out


def _eligible_weight(w: torch.Tensor, b: torch.Tensor | None, n_out: int, n_in: int) -> bool:
    return (w.dtype is torch.float32 and w.is_cpu and w.is_contiguous() and w.shape == (n_out, n_in)
            and (b is None or (b.dtype is torch.float32 and b.is_cpu and b.is_contiguous())))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for weights that are not an ``nn.Linear`` of a routed model (e.g. a drafter's
    cut of the LM head): inside an active :func:`few_row_linears` block, inputs of at most its
    ``max_rows`` rows of fp32 CPU inference go through :func:`linear_rows` too."""
    limit = _ROUTING.get()
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    if (not limit or rows > limit or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            or weight.dim() != 2 or x.shape[-1] != weight.shape[1]):
        return F.linear(x, weight, bias)
    return linear_rows(x, weight, bias)


def _eligible(m: torch.nn.Module) -> bool:
    return type(m) is torch.nn.Linear and _eligible_weight(m.weight, m.bias, m.out_features, m.in_features)


@contextlib.contextmanager
def few_row_linears(model: torch.nn.Module, max_rows: int = MAX_ROWS) -> Iterator[int]:
    """Inside the block, every plain fp32 CPU ``nn.Linear`` of ``model`` computes inputs of at most
    ``max_rows`` rows (and not needing gradients) with :func:`linear_rows`; other inputs, and other
    layers (quantized, pruned: they have their own kernels), are unchanged. Yields how many layers
    were routed (0 when the kernel is not built here or :func:`~llmdeploy.kernels.use_reference`
    is on). :func:`linear` calls inside the block are routed the same way."""
    if forced_reference() or not available():
        yield 0
        return
    fn = _fn("linear_rows")
    layers = [m for m in model.modules() if _eligible(m) and "forward" not in m.__dict__]

    def make(m: torch.nn.Linear):
        params = m._parameters  # read on every call: a replaced weight or bias is picked up
        n_out, n_in = m.weight.shape

        def forward(x: torch.Tensor) -> torch.Tensor:
            w, b = params["weight"], params.get("bias")
            rows = x.numel() // n_in if x.dim() else 0
            if (rows > max_rows or x.dtype is not torch.float32 or not x.is_cpu or x.shape[-1] != n_in
                    or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
                    or not _eligible_weight(w, b, n_out, n_in)):
                return F.linear(x, w, b)
            return _call(fn, x if x.is_contiguous() else x.contiguous(), w, b, rows)
        return forward

    for m in layers:
        m.forward = make(m)
    token = _ROUTING.set(max_rows)
    try:
        yield len(layers)
    finally:
        _ROUTING.reset(token)
        for m in layers:
            m.__dict__.pop("forward", None)
