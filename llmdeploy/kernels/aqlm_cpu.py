"""CPU matrix-vector kernels for AQLM layers (C, or numba without a compiler), for batch-1 decoding.

``csrc/aqlm.c`` (built by :mod:`.native`) is used when it builds: table lookups for codebooks of at
most 256 entries (with AVX-512, a 256-entry table row held in 16 registers and read with register
permutes, 16 outputs at a time; with AVX2, gathers of eight entries), and a codeword-streaming kernel (8 outputs at a time)
for larger ones such as 1x16; for many tokens (prefill) it decodes the weight once and one BLAS
matmul follows. Without a compiler the numba kernels below compute the same decode-step sums.

For codebooks of at most 4096 entries (2x8, 1x8, 4x8...) the kernel first builds a lookup table
``lut[b, j, c, k] = x[b, group j] · codebooks[c, k]`` (small: in/in_group_size x C x K floats),
then every output is a sum of ``in/in_group_size x C`` table entries read through the codes: one
byte per code instead of ``in_group_size`` fp32 weights, which is what lets it beat a dense matvec
whose cost is reading the weight. The codes are streamed in a transposed copy cached on the
layer: tiles of 64 outputs, (out / 64, in groups, codebooks, 64), so that each table row stays in L1
while a tile accumulates (AVX2); for the AVX-512 kernel, which walks table rows outer and outputs
inner, (in groups, codebooks, out) padded to 64 outputs. Threads split the input groups: each builds
and reads only its own table rows, and their partial sums are added at the end (split by outputs,
each core read table rows the other had written). Larger codebooks (1x16) gather the codewords and
multiply directly, tiles of outputs in parallel.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import importable, native

GEMV_MAX_TOKENS = 8
#: above this codebook size the lookup table would be larger than reading the codewords
LUT_MAX_CODEBOOK = 4096


def available() -> bool:
    """Whether a CPU kernel is here: the C one (built on first use) or numba's."""
    return _available(native.current_isa())


def c_available() -> bool:
    """Whether the C kernel built here (the numba kernels have no many-token path)."""
    return _c_isa("aqlm_simd", native.current_isa()) is not None


@functools.cache
def _available(isa: str) -> bool:
    return _c_isa("aqlm_simd", isa) is not None or importable("numba")


def _c(symbol: str):
    return _c_isa(symbol, native.current_isa())


@functools.cache
def _c_isa(symbol: str, isa: str):
    import ctypes

    from .native import function
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    matvec = (p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i32, i32)
    sig = {"aqlm_simd": (), "aqlm_lut_matvec": matvec, "aqlm_direct_matvec": matvec,
           "aqlm_dequantize": (p, i32, p, p, p, i64, i64, i64, i64, i64, i32, i32)}[symbol]
    returns_int = symbol in ("aqlm_simd", "aqlm_lut_matvec", "aqlm_direct_matvec")
    return function("aqlm", symbol, sig, ctypes.c_int if returns_int else None)


#: codebooks up to this size take the C table kernel (one byte per code); larger ones stream codewords
C_LUT_MAX_CODEBOOK = 256


@functools.cache
def _kernels():
    import numba

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def build_lut(x, books_t, lut):  # x (B, G, g); books_t (C, g, K); lut (B, G, C, K)
        # in numba too: a torch matmul here would leave torch's OpenMP threads spinning against
        # numba's for the kernel that follows
        n_b, n_g, g = x.shape
        n_c, _, n_k = books_t.shape
        for task in numba.prange(n_b * n_g):
            b = task // n_g
            j = task % n_g
            for c in range(n_c):
                row = lut[b, j, c]
                for k in range(n_k):
                    row[k] = numba.float32(0.0)
                for t in range(g):
                    v = x[b, j, t]
                    bt = books_t[c, t]
                    for k in range(n_k):
                        row[k] += v * bt[k]

    def make_gemv_lut(masked: bool):
        @numba.njit(parallel=True, fastmath=True, cache=True)
        def gemv_lut(lut, codes_t, scales, out, mask, tile):  # lut (B, G, C, K); codes_t (G, C, O)
            # Each task owns `tile` consecutive outputs of one token. For each input group and
            # codebook the table row (K floats) stays in L1 while the codes of the tile stream
            # past it contiguously into independent sums.
            n_b, n_g, n_c, _ = lut.shape
            n_o = codes_t.shape[2]
            n_t = (n_o + tile - 1) // tile
            for task in numba.prange(n_t * n_b):
                b = task // n_t
                i0 = (task % n_t) * tile
                n = min(tile, n_o - i0)
                acc = np.zeros(n, np.float32)
                for j in range(n_g):
                    for c in range(n_c):
                        row = lut[b, j, c]
                        cj = codes_t[j, c, i0:i0 + n]
                        if masked:
                            for i in range(n):
                                acc[i] += row[cj[i] & mask]
                        else:  # 8-bit codes read as uint8 are exact: no masking (measured ~1.5x faster)
                            for i in range(n):
                                acc[i] += row[cj[i]]
                for i in range(n):
                    out[b, i0 + i] = acc[i] * scales[i0 + i]

        return gemv_lut

    gemv_lut, gemv_lut_masked = make_gemv_lut(False), make_gemv_lut(True)

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

    return build_lut, gemv_lut, gemv_lut_masked, gemv_direct


TILE = 2048  # outputs per task (measured: 2048 beats 256-1024 on 11008 x 4096)


def transposed_codes(module) -> np.ndarray:
    """The codes as (in groups, codebooks, out) unsigned integers, the layout the table kernel
    streams. Cached on the module (as much memory again as the codes) and rebuilt whenever the
    codes tensor is replaced or modified in place; the ``codes`` parameter itself is never
    changed (the aqlm package permutes it in place on its first CPU call)."""
    codes = module.codes
    key = (codes.data_ptr(), codes._version, tuple(codes.shape))
    cached = getattr(module, "_cpu_codes_t", None)
    if cached is None or cached[0] != key:
        dtype = np.uint8 if codes.dtype == torch.int8 else np.uint16
        t = np.ascontiguousarray(codes.detach().numpy().view(dtype).transpose(1, 2, 0))
        module._cpu_codes_t = (key, t)
    return module._cpu_codes_t[1]


def transposed_books(module) -> np.ndarray:
    """The codebooks as (codebooks, in_group_size, K) float32 (cached like the codes)."""
    books = module.codebooks
    key = (books.data_ptr(), books._version, tuple(books.shape))
    cached = getattr(module, "_cpu_books_t", None)
    if cached is None or cached[0] != key:
        c, k, _, g = books.shape
        t = np.ascontiguousarray(books.detach().reshape(c, k, g).permute(0, 2, 1).numpy())
        module._cpu_books_t = (key, t)
    return module._cpu_books_t[1]


#: outputs per tile of the C table kernel (csrc/aqlm.c TILE)
C_TILE = 64


def tiled_codes(codes: torch.Tensor) -> torch.Tensor:
    """8-bit codes (out, groups, codebooks) in the C table kernel's layout (ceil(out / 64), groups,
    codebooks, 64) as unsigned bytes; the last tile padded with zeros (never read as outputs)."""
    out_f = codes.shape[0]
    u8 = codes.contiguous().view(torch.uint8)
    u8 = torch.nn.functional.pad(u8, (0, 0, 0, 0, 0, (-out_f) % C_TILE))
    return u8.reshape(-1, C_TILE, *codes.shape[1:]).permute(0, 2, 3, 1).contiguous()


def _codes_u16(module) -> torch.Tensor:
    """The codes (out, groups, codebooks) as int16 storage whose bits the C kernel reads as uint16
    (cached like the transposed codes; 8-bit storage widened with its sign, masked in the kernel)."""
    codes = module.codes
    key = (codes.data_ptr(), codes._version, tuple(codes.shape))
    cached = getattr(module, "_cpu_codes_u16", None)
    if cached is None or cached[0] != key:
        module._cpu_codes_u16 = (key, codes.detach().to(torch.int16).contiguous())
    return module._cpu_codes_u16[1]


def _c_plan(module) -> tuple:
    """What every C call for ``module`` passes, resolved once: (function, weight pointers, shape
    arguments, tensors kept alive). Rebuilt when codes, codebooks, scales or bias change (in place
    included) or another instruction-set variant is asked for; a decode step calls this ~200 times."""
    ps = module._parameters  # not module.codes: nn.Module's __getattr__ costs ~1 us per name
    codes, books, scales, bias = ps["codes"], ps["codebooks"], ps["scales"], ps.get("bias")
    key = (native.current_isa(), codes.data_ptr(), codes._version, books.data_ptr(), books._version, scales.data_ptr(),
           scales._version, None if bias is None else (bias.data_ptr(), bias._version))
    cached = module.__dict__.get("_cpu_c_plan")
    if cached is not None and cached[0] == key:
        return cached[1]
    g, n_c, k, n_o = module.in_group_size, module.num_codebooks, module.codebook_size, module.out_features
    n_g = module.in_features // g
    scales = module.scales.detach().reshape(-1).float().contiguous()
    bias = None if module.bias is None else module.bias.detach().float().contiguous()
    if k <= C_LUT_MAX_CODEBOOK and module.codes.dtype == torch.int8:
        books, codes = torch.from_numpy(transposed_books(module)), tiled_codes(codes.detach())
        if k == 256 and _c("aqlm_simd")() == 512:  # the AVX-512 permute kernel reads a (j, c) row at a time
            codes = codes.permute(1, 2, 0, 3).contiguous()
        fn = _c("aqlm_lut_matvec")
    else:
        books, codes = module.codebooks.detach().reshape(n_c, k, g).float().contiguous(), _codes_u16(module)
        fn = _c("aqlm_direct_matvec")
    ptrs = (books.data_ptr(), codes.data_ptr(), scales.data_ptr(), None if bias is None else bias.data_ptr())
    plan = (fn, ptrs, (n_g, g, n_c, k, n_o, k - 1), (books, codes, scales, bias))
    module._cpu_c_plan = (key, plan)
    return plan


def aqlm_gemv_c(x: torch.Tensor, module) -> torch.Tensor:
    """``module(x)`` with the C kernels (see the module docstring)."""
    fn, ptrs, dims, _ = _c_plan(module)
    n_o = dims[4]
    if not x.is_contiguous():
        x = x.contiguous()
    out = torch.empty((*x.shape[:-1], n_o), dtype=torch.float32)
    if fn(x.data_ptr(), *ptrs, out.data_ptr(), x.numel() // x.shape[-1], *dims, torch.get_num_threads()) != 0:
        raise MemoryError("the AQLM kernel could not allocate its lookup table")
    return out


def dequantize_c(module) -> torch.Tensor:
    """The dense fp32 weight (out, in) of an AQLM layer (out_group_size 1), decoded in C: what
    :func:`~llmdeploy.quant.aqlm_linear.dequantize` computes: codewords summed in codebook order, then
    scaled (bit for bit up to 4 codebooks; torch reduces more in another order)."""
    ps = module._parameters
    codes = ps["codes"].detach().contiguous()
    g, n_c, k, n_o = module.in_group_size, module.num_codebooks, module.codebook_size, module.out_features
    books = ps["codebooks"].detach().reshape(n_c, k, g).float().contiguous()
    scales = ps["scales"].detach().reshape(-1).float().contiguous()
    w = torch.empty(n_o, module.in_features, dtype=torch.float32)
    _c("aqlm_dequantize")(codes.data_ptr(), codes.element_size(), books.data_ptr(), scales.data_ptr(), w.data_ptr(),
                          n_o, module.in_features // g, g, n_c, k, k - 1, torch.get_num_threads())
    return w


def aqlm_dequant_matmul(x: torch.Tensor, module) -> torch.Tensor:
    """``module(x)`` for many tokens on CPU (prefill): the weight decoded once in C, one BLAS matmul."""
    bias = module._parameters.get("bias")
    return torch.nn.functional.linear(x, dequantize_c(module), None if bias is None else bias.detach().float())


def aqlm_gemv(x: torch.Tensor, module) -> torch.Tensor:
    """``module(x)`` for a few tokens of fp32 input on CPU (out_group_size 1): the C kernel when it
    builds here, else numba's."""
    if _c_isa("aqlm_simd", native.current_isa()) is not None:
        return aqlm_gemv_c(x, module)
    return aqlm_gemv_numba(x, module)


def aqlm_gemv_numba(x: torch.Tensor, module) -> torch.Tensor:
    """``module(x)`` with the numba kernels."""
    build_lut, gemv_lut, gemv_lut_masked, gemv_direct = _kernels()
    shape = x.shape
    xb = x.reshape(-1, module.in_features).contiguous()
    n_b, g = xb.shape[0], module.in_group_size
    n_c, k = module.num_codebooks, module.codebook_size
    books = module.codebooks.detach().reshape(n_c, k, g)
    nbits = module.nbits_per_codebook
    scales = module.scales.detach().reshape(-1).numpy()
    out = torch.empty(n_b, module.out_features, dtype=torch.float32)
    mask = k - 1
    with torch.no_grad():
        if k <= LUT_MAX_CODEBOOK:
            n_g = module.in_features // g
            lut = np.empty((n_b, n_g, n_c, k), dtype=np.float32)
            build_lut(xb.view(n_b, n_g, g).numpy(), transposed_books(module), lut)
            kernel = gemv_lut if nbits == 8 else gemv_lut_masked
            kernel(lut, transposed_codes(module), scales, out.numpy(), mask, TILE)
        else:
            codes = module.codes.detach().numpy()
            if nbits == 16:  # the signed storage read as unsigned is the code itself
                codes = codes.view(np.uint16)
            gemv_direct(xb.view(n_b, -1, g).numpy(), books.contiguous().numpy(), codes, scales, out.numpy(), mask)
    if module.bias is not None:
        out += module.bias.detach()
    return out.view(*shape[:-1], module.out_features)
