"""Triton kernel for the per-row (multi-tenant) sign matmul ``y[n] = x[n] · signs[tenant[n]]ᵀ``.

Each program owns ``BLOCK_O`` outputs of one row; it walks the input in chunks of ``BLOCK_B``
packed bytes (8 inputs each), loads those bytes for its outputs from the row's tenant, expands the
bits to ±1 in registers and accumulates their products with the input chunk — the sign matrix is
never materialised and only its bits stream from memory. On CPU tensors it runs under
``TRITON_INTERPRET=1`` (how the tests check it against the reference).
"""

from __future__ import annotations

import functools

import torch

from . import importable


def available() -> bool:
    return importable("triton")


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, packed_ptr, tenant_ptr, out_ptr, n_in, n_out, n_bytes,
               BLOCK_O: tl.constexpr, BLOCK_B: tl.constexpr):
        pid_o = tl.program_id(0)
        n = tl.program_id(1)
        t = tl.load(tenant_ptr + n).to(tl.int64)
        rows = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        rmask = rows < n_out
        bit = tl.arange(0, 8)
        acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
        for j0 in range(0, n_bytes, BLOCK_B):
            js = j0 + tl.arange(0, BLOCK_B)
            jmask = js < n_bytes
            idx = js[:, None] * 8 + bit[None, :]  # (BLOCK_B, 8) input positions
            xv = tl.load(x_ptr + n * n_in + idx, mask=jmask[:, None] & (idx < n_in), other=0.0).to(tl.float32)
            byte = tl.load(packed_ptr + t * n_out * n_bytes + rows[:, None] * n_bytes + js[None, :],
                           mask=rmask[:, None] & jmask[None, :], other=0).to(tl.int32)
            sgn = ((byte[:, :, None] >> bit[None, None, :]) & 1).to(tl.float32) * 2.0 - 1.0  # (O, B, 8)
            acc += tl.sum(tl.sum(sgn * xv[None, :, :], axis=2), axis=1)
        tl.store(out_ptr + n * n_out + rows, acc, mask=rmask)

    return triton, kernel


def multi_binary_matmul(x: torch.Tensor, packed: torch.Tensor, tenant: torch.Tensor, in_features: int,
                        block_o: int = 32, block_b: int = 16) -> torch.Tensor:
    """Row ``n`` of ``x`` (N, in) times the ±1 signs of tenant ``tenant[n]`` (``packed``: T, out, in/8)."""
    triton, kernel = _kernel()
    x = x.contiguous()
    packed = packed.contiguous()
    n_rows = x.shape[0]
    _, n_out, n_bytes = packed.shape
    out = torch.empty(n_rows, n_out, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n_out, block_o), n_rows)
    kernel[grid](x, packed, tenant.to(torch.int64).contiguous(), out, in_features, n_out, n_bytes,
                 BLOCK_O=block_o, BLOCK_B=block_b)
    return out
