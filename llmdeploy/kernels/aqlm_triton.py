"""Triton kernels for AQLM layers (out_group_size 1, power-of-two in_group_size).

- ``aqlm_gemv``: a few tokens. Each program owns ``BLOCK_O`` output rows of one token and walks
  the input groups: it loads the codes, gathers the codewords from the codebooks (which stay in
  cache) and accumulates their dot products with the input group, so the weight is never
  materialised and only the codes stream from memory.
- ``aqlm_dequant_matmul``: many tokens. One kernel decodes the weight tile by tile, then a dense
  matmul (cuBLAS) runs on it: for large batches decoding is amortised and the matmul dominates.

On CPU tensors they run under ``TRITON_INTERPRET=1`` (how the tests check them against the
reference).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import importable

GEMV_MAX_TOKENS = 8


def available() -> bool:
    return importable("triton")


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_kernel(x_ptr, codes_ptr, books_ptr, scales_ptr, out_ptr, n_out, n_groups,
                    NUM_CB: tl.constexpr, K: tl.constexpr, G: tl.constexpr,
                    BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr):
        pid_o = tl.program_id(0)
        b = tl.program_id(1)
        rows = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        rmask = rows < n_out
        t = tl.arange(0, G)
        acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
        for j0 in range(0, n_groups, BLOCK_J):
            js = j0 + tl.arange(0, BLOCK_J)
            jmask = js < n_groups
            xg = tl.load(x_ptr + b * n_groups * G + js[:, None] * G + t[None, :],
                         mask=jmask[:, None], other=0.0).to(tl.float32)
            m2 = rmask[:, None] & jmask[None, :]
            for c in tl.static_range(NUM_CB):
                code = tl.load(codes_ptr + rows[:, None] * (n_groups * NUM_CB) + js[None, :] * NUM_CB + c,
                               mask=m2, other=0).to(tl.int32) & (K - 1)
                w = tl.load(books_ptr + (c * K + code)[:, :, None] * G + t[None, None, :],
                            mask=m2[:, :, None], other=0.0).to(tl.float32)
                acc += tl.sum(tl.sum(w * xg[None, :, :], axis=2), axis=1)
        scale = tl.load(scales_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + b * n_out + rows, acc * scale, mask=rmask)

    @triton.jit
    def dequant_kernel(codes_ptr, books_ptr, scales_ptr, w_ptr, n_out, n_groups,
                       NUM_CB: tl.constexpr, K: tl.constexpr, G: tl.constexpr,
                       BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        js = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        t = tl.arange(0, G)
        m2 = (rows < n_out)[:, None] & (js < n_groups)[None, :]
        acc = tl.zeros((BLOCK_O, BLOCK_J, G), dtype=tl.float32)
        for c in tl.static_range(NUM_CB):
            code = tl.load(codes_ptr + rows[:, None] * (n_groups * NUM_CB) + js[None, :] * NUM_CB + c,
                           mask=m2, other=0).to(tl.int32) & (K - 1)
            acc += tl.load(books_ptr + (c * K + code)[:, :, None] * G + t[None, None, :],
                           mask=m2[:, :, None], other=0.0).to(tl.float32)
        scale = tl.load(scales_ptr + rows, mask=rows < n_out, other=0.0).to(tl.float32)
        acc = acc * scale[:, None, None]
        tl.store(w_ptr + rows[:, None, None] * (n_groups * G) + js[None, :, None] * G + t[None, None, :],
                 acc.to(w_ptr.dtype.element_ty), mask=m2[:, :, None])

    return triton, gemv_kernel, dequant_kernel


def supports(module) -> bool:
    """Whether the Triton kernels take this layer's shape (out_group_size 1, power-of-two
    in_group_size); others run the reference."""
    g = module.in_group_size
    return module.out_group_size == 1 and g > 0 and not g & (g - 1)


def _check(module) -> None:
    if not supports(module):
        raise ValueError("the Triton AQLM kernels need out_group_size 1 and a power-of-two in_group_size")


def aqlm_gemv(x: torch.Tensor, module, block_o: int = 64, block_j: int = 16) -> torch.Tensor:
    """``module(x)`` for a few tokens: codes are decoded on the fly, the weight never built."""
    triton, gemv_kernel, _ = _kernels()
    _check(module)
    shape = x.shape
    xb = x.reshape(-1, module.in_features).contiguous()
    n_b, n_out = xb.shape[0], module.out_features
    out = torch.empty(n_b, n_out, dtype=torch.float32, device=x.device)
    n_groups = module.in_features // module.in_group_size
    grid = (triton.cdiv(n_out, block_o), n_b)
    gemv_kernel[grid](xb, module.codes.detach(), module.codebooks.detach(), module.scales.detach(), out, n_out,
                      n_groups, NUM_CB=module.num_codebooks, K=module.codebook_size, G=module.in_group_size,
                      BLOCK_O=block_o, BLOCK_J=block_j)
    out = out.to(x.dtype)
    if module.bias is not None:
        out += module.bias.detach().to(x.dtype)
    return out.view(*shape[:-1], n_out)


def aqlm_dequantize(module, block_o: int = 32, block_j: int = 16) -> torch.Tensor:
    """The dense weight (out, in) decoded by the Triton kernel, in the codebooks' dtype."""
    triton, _, dequant_kernel = _kernels()
    _check(module)
    n_out, n_groups = module.out_features, module.in_features // module.in_group_size
    w = torch.empty(n_out, module.in_features, dtype=module.codebooks.dtype, device=module.codebooks.device)
    grid = (triton.cdiv(n_out, block_o), triton.cdiv(n_groups, block_j))
    dequant_kernel[grid](module.codes.detach(), module.codebooks.detach(), module.scales.detach(), w, n_out,
                         n_groups, NUM_CB=module.num_codebooks, K=module.codebook_size, G=module.in_group_size,
                         BLOCK_O=block_o, BLOCK_J=block_j)
    return w


def aqlm_dequant_matmul(x: torch.Tensor, module) -> torch.Tensor:
    """``module(x)`` for many tokens: decode the weight with Triton, then one dense matmul."""
    w = aqlm_dequantize(module).to(x.dtype)
    return F.linear(x, w, None if module.bias is None else module.bias.detach().to(x.dtype))
