"""The Triton JIT functions of :mod:`llmdeploy.kernels.quant_triton` (imported only when Triton is)."""

import triton
import triton.language as tl


@triton.jit
def tile(q_ptr, s_ptr, z_ptr, rows, ks, m2, n_bytes, n_groups, group_size,
         BITS: tl.constexpr, SYM: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    """The dequantized weights (rows x ks) from the packed codes: ``(code − z)·s``."""
    per: tl.constexpr = 8 // BITS
    mask_v: tl.constexpr = (1 << BITS) - 1
    byte = tl.load(q_ptr + rows[:, None] * n_bytes + (ks // per)[None, :], mask=m2, other=0).to(tl.int32)
    code = (byte >> ((ks % per) * BITS)[None, :]) & mask_v
    g = ks // group_size
    s = tl.load(s_ptr + rows[:, None] * n_groups + g[None, :], mask=m2, other=0.0).to(tl.float32)
    if SYM:
        z = tl.full((BLOCK_O, BLOCK_K), 1 << (BITS - 1), tl.float32)
    else:
        z = tl.load(z_ptr + rows[:, None] * n_groups + g[None, :], mask=m2, other=0).to(tl.float32)
    return (code.to(tl.float32) - z) * s


@triton.jit
def gemv(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, out_ptr, n_in, n_out, n_bytes, n_groups, group_size,
         BITS: tl.constexpr, SYM: tl.constexpr, HAS_BIAS: tl.constexpr,
         BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_o = tl.program_id(0)
    n = tl.program_id(1)
    rows = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    rmask = rows < n_out
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < n_in
        m2 = rmask[:, None] & kmask[None, :]
        xv = tl.load(x_ptr + n * n_in + ks, mask=kmask, other=0.0).to(tl.float32)
        w = tile(q_ptr, s_ptr, z_ptr, rows, ks, m2, n_bytes, n_groups, group_size, BITS, SYM, BLOCK_O, BLOCK_K)
        acc += tl.sum(w * xv[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + n * n_out + rows, acc, mask=rmask)


@triton.jit
def dequant(q_ptr, s_ptr, z_ptr, w_ptr, n_in, n_out, n_bytes, n_groups, group_size,
            BITS: tl.constexpr, SYM: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m2 = (rows < n_out)[:, None] & (ks < n_in)[None, :]
    w = tile(q_ptr, s_ptr, z_ptr, rows, ks, m2, n_bytes, n_groups, group_size, BITS, SYM, BLOCK_O, BLOCK_K)
    tl.store(w_ptr + rows[:, None] * n_in + ks[None, :], w, mask=m2)
