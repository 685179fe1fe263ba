"""Triton kernels for RTN/GPTQ layers on GPU, reading the checkpoint's own packed layout.

For 2-, 4- and 8-bit codes (``8 / bits`` codes per byte along the input dimension, low bits
first — :mod:`llmdeploy.quant.packing`), nothing is repacked:

- :func:`wonly_gemv` (few token rows, decoding): each program owns ``BLOCK_O`` outputs of one row,
  walks the input in chunks of ``BLOCK_K``, unpacks the codes in registers, applies each input's
  group scale and zero point and accumulates ``ŵ·x`` in fp32 — only the packed bytes stream from
  memory;
- :func:`wonly_dequantize` (many rows, prefill): the dense weight in tiles, then one cuBLAS matmul.

Other widths (3, 5–7 bits pack 8 codes into ``bits`` bytes) use the plain-torch reference. On CPU
tensors the kernels run under ``TRITON_INTERPRET=1``, which is how the tests check them.
"""

from __future__ import annotations

import functools

import torch

from . import importable

#: at most this many token rows take the matrix-vector kernel; more dequantize once + matmul
GEMV_MAX_ROWS = 8
BITS = (2, 4, 8)


def available() -> bool:
    return importable("triton")


def supports(bits: int) -> bool:
    return bits in BITS and available()


@functools.cache
def _kernels():
    import triton

    from . import _quant_triton_jit as jit

    return triton, jit.gemv, jit.dequant


def _check(qweight: torch.Tensor, bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"the Triton kernels take {BITS}-bit codes, got {bits} (use the reference)")


def wonly_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               bits: int, group_size: int, bias: torch.Tensor | None = None,
               block_o: int = 32, block_k: int = 64) -> torch.Tensor:
    """``x · Ŵᵀ + bias`` (fp32 out) for ``x`` (N, in) and the packed codes ``qweight`` (out, in·bits/8)."""
    _check(qweight, bits)
    triton, gemv, _ = _kernels()
    x = x.contiguous()
    n, n_in = x.shape
    n_out, n_groups = scales.shape
    out = torch.empty(n, n_out, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n_out, block_o), n)
    gemv[grid](x, qweight.contiguous(), scales.contiguous(), zeros.contiguous() if zeros is not None else scales,
               bias.contiguous() if bias is not None else out, out, n_in, n_out, qweight.shape[1], n_groups,
               group_size, BITS=bits, SYM=zeros is None, HAS_BIAS=bias is not None, BLOCK_O=block_o, BLOCK_K=block_k)
    return out


def wonly_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                     group_size: int, in_features: int, block_o: int = 32, block_k: int = 64) -> torch.Tensor:
    """The dense fp32 weight (out, in) of packed codes (Triton)."""
    _check(qweight, bits)
    triton, _, dequant = _kernels()
    n_out, n_groups = scales.shape
    w = torch.empty(n_out, in_features, dtype=torch.float32, device=qweight.device)
    grid = (triton.cdiv(n_out, block_o), triton.cdiv(in_features, block_k))
    dequant[grid](qweight.contiguous(), scales.contiguous(), zeros.contiguous() if zeros is not None else scales, w,
                  in_features, n_out, qweight.shape[1], n_groups, group_size, BITS=bits, SYM=zeros is None,
                  BLOCK_O=block_o, BLOCK_K=block_k)
    return w
