"""CPU matrix-vector kernels for AQLM layers (numba), for batch-1 decoding.

For codebooks of at most 4096 entries (2x8, 1x8, 4x8...) the kernel first builds a lookup table
``lut[b, j, c, k] = x[b, group j] · codebooks[c, k]`` (tiny: in/8 x C x K floats, cached), then
every output is a sum of ``in/in_group_size x C`` table entries read through the codes: it reads
one byte per code instead of ``in_group_size`` fp32 weights, which is what makes it faster than a
dense matvec whose cost is reading the weight. Larger codebooks (1x16) gather the codeword and
multiply directly. Output rows run in parallel (no two threads write one output).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

GEMV_MAX_TOKENS = 8
#: above this codebook size the lookup table would be larger than reading the codewords
LUT_MAX_CODEBOOK = 4096


@functools.cache
def available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernels():
    import numba

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def gemv_lut2(lut, codes, scales, out):  # two codebooks, codes as unsigned ints (no masking)
        # four output rows per step: four independent sums keep the table lookups in flight
        n_b, n_g = lut.shape[0], lut.shape[1]
        n_o = codes.shape[0]
        n_full = n_o // 4
        for q in numba.prange(n_full + (n_o % 4 > 0)):
            i = q * 4
            if q < n_full:
                for b in range(n_b):
                    a0 = numba.float32(0.0)
                    a1 = numba.float32(0.0)
                    a2 = numba.float32(0.0)
                    a3 = numba.float32(0.0)
                    for j in range(n_g):
                        l0 = lut[b, j, 0]
                        l1 = lut[b, j, 1]
                        a0 += l0[codes[i, j, 0]] + l1[codes[i, j, 1]]
                        a1 += l0[codes[i + 1, j, 0]] + l1[codes[i + 1, j, 1]]
                        a2 += l0[codes[i + 2, j, 0]] + l1[codes[i + 2, j, 1]]
                        a3 += l0[codes[i + 3, j, 0]] + l1[codes[i + 3, j, 1]]
                    out[b, i] = a0 * scales[i]
                    out[b, i + 1] = a1 * scales[i + 1]
                    out[b, i + 2] = a2 * scales[i + 2]
                    out[b, i + 3] = a3 * scales[i + 3]
            else:
                for r in range(i, n_o):
                    for b in range(n_b):
                        acc = numba.float32(0.0)
                        for j in range(n_g):
                            acc += lut[b, j, 0, codes[r, j, 0]] + lut[b, j, 1, codes[r, j, 1]]
                        out[b, r] = acc * scales[r]

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def gemv_lut(lut, codes, scales, out, mask):  # any number of codebooks; lut (B, G, C, K)
        n_b, n_g, n_c, _ = lut.shape
        n_o = codes.shape[0]
        n_full = n_o // 4
        for q in numba.prange(n_full + (n_o % 4 > 0)):
            i = q * 4
            if q < n_full:
                for b in range(n_b):
                    a0 = numba.float32(0.0)
                    a1 = numba.float32(0.0)
                    a2 = numba.float32(0.0)
                    a3 = numba.float32(0.0)
                    for j in range(n_g):
                        for c in range(n_c):
                            row = lut[b, j, c]
                            a0 += row[codes[i, j, c] & mask]
                            a1 += row[codes[i + 1, j, c] & mask]
                            a2 += row[codes[i + 2, j, c] & mask]
                            a3 += row[codes[i + 3, j, c] & mask]
                    out[b, i] = a0 * scales[i]
                    out[b, i + 1] = a1 * scales[i + 1]
                    out[b, i + 2] = a2 * scales[i + 2]
                    out[b, i + 3] = a3 * scales[i + 3]
            else:
                for r in range(i, n_o):
                    for b in range(n_b):
                        acc = numba.float32(0.0)
                        for j in range(n_g):
                            for c in range(n_c):
                                acc += lut[b, j, c, codes[r, j, c] & mask]
                        out[b, r] = acc * scales[r]

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def gemv_direct(x, books, codes, scales, out, mask):  # x (B, G, g); books (C, K, g)
        n_b, n_g, g = x.shape
        n_c = books.shape[0]
        for i in numba.prange(codes.shape[0]):
            for b in range(n_b):
                acc = numba.float32(0.0)
                for j in range(n_g):
                    for c in range(n_c):
                        k = codes[i, j, c] & mask
                        for t in range(g):
                            acc += books[c, k, t] * x[b, j, t]
                out[b, i] = acc * scales[i]

    return gemv_lut2, gemv_lut, gemv_direct


def aqlm_gemv(x: torch.Tensor, module) -> torch.Tensor:
    """``module(x)`` for a few tokens of fp32 input on CPU (out_group_size 1)."""
    gemv_lut2, gemv_lut, gemv_direct = _kernels()
    shape = x.shape
    xb = x.reshape(-1, module.in_features).contiguous()
    n_b, g = xb.shape[0], module.in_group_size
    n_c, k = module.num_codebooks, module.codebook_size
    books = module.codebooks.detach().reshape(n_c, k, g)
    codes = module.codes.detach().numpy()
    nbits = module.nbits_per_codebook
    if nbits in (8, 16):  # the signed storage read as unsigned is the code itself: no masking
        codes = codes.view(np.uint8 if nbits == 8 else np.uint16)
    scales = module.scales.detach().reshape(-1).numpy()
    out = torch.empty(n_b, module.out_features, dtype=torch.float32)
    mask = k - 1
    with torch.no_grad():
        if k <= LUT_MAX_CODEBOOK:
            lut = (xb.view(n_b * (module.in_features // g), g) @ books.reshape(n_c * k, g).T)
            lut = lut.view(n_b, module.in_features // g, n_c, k).contiguous()
            if n_c == 2 and nbits in (8, 16):
                gemv_lut2(lut.numpy(), codes, scales, out.numpy())
            else:
                gemv_lut(lut.numpy(), codes, scales, out.numpy(), mask)
        else:
            gemv_direct(xb.view(n_b, -1, g).numpy(), books.contiguous().numpy(), codes, scales, out.numpy(), mask)
    if module.bias is not None:
        out += module.bias.detach()
    return out.view(*shape[:-1], module.out_features)
