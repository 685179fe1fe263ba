"""Sign-bit (1-bit) matrices: packing and the matmul ``x · sign(Δ)ᵀ`` (BitDelta's deltas).

Signs are packed 8 per byte along the input dimension, bit ``k`` of byte ``j`` holding input
``8j + k`` (1 = +1, 0 = −1; a zero delta counts as +1). Since ``x·s = 2·Σ_{bit=1} x − Σ x``, the
CPU kernel (numba) builds per token a lookup table of the 256 partial sums of every 8 inputs
(32 adds per input) and then each output is ``in/8`` table reads through the packed bytes: one
bit per weight is what it reads, instead of 32. The multi-tenant variant takes a tenant index per
row, so one call applies a different delta to each row of a batch. Both are checked against
:func:`binary_matmul_reference`.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import importable

#: above this many rows the table per row costs more than unpacking the signs once
KERNEL_MAX_ROWS = 16
_BIT = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8)


def pack_signs(delta: torch.Tensor) -> torch.Tensor:
    """(out, in) real matrix -> (out, ceil(in / 8)) uint8 of its signs (``>= 0`` is +1)."""
    out_f, in_f = delta.shape
    bits = (delta >= 0).to(torch.uint8)
    pad = (-in_f) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.view(out_f, -1, 8)
    return (bits * _BIT.to(bits.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: the ±1 matrix (out, in_features)."""
    bits = (packed[..., None] & _BIT.to(packed.device)) != 0
    bits = bits.flatten(-2)[..., :in_features]
    return bits.to(dtype) * 2 - 1


def binary_matmul_reference(x: torch.Tensor, packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """``x @ sign^T`` by unpacking (the plain-torch reference)."""
    return x @ unpack_signs(packed, in_features, x.dtype).T


def multi_binary_matmul_reference(x: torch.Tensor, packed: torch.Tensor, tenant: torch.Tensor,
                                  in_features: int) -> torch.Tensor:
    """Row ``n`` of ``x`` (N, in) times the signs of tenant ``tenant[n]`` (``packed``: T, out, in/8)."""
    out = x.new_zeros(x.shape[0], packed.shape[1])
    for t in torch.unique(tenant).tolist():
        rows = (tenant == t).nonzero(as_tuple=True)[0]
        out[rows] = binary_matmul_reference(x[rows], packed[t], in_features)
    return out


def available() -> bool:
    return importable("numba")


@functools.cache
def _kernel():
    import numba

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def kernel(x, packed, tenant, out):  # x (N, IN) f32; packed (T, O, NB) u8; tenant (N,) i64; out (N, O)
        n_rows, n_in = x.shape
        _, n_out, n_bytes = packed.shape
        lut = np.zeros((n_bytes, 256), np.float32)
        for n in range(n_rows):
            for j in numba.prange(n_bytes):  # lut[j, b] = sum of the inputs 8j+k whose bit k is set in b
                row = lut[j]
                row[0] = 0.0
                for b in range(1, 256):
                    low = b & (-b)
                    k = 0
                    while (1 << k) != low:
                        k += 1
                    idx = 8 * j + k
                    v = x[n, idx] if idx < n_in else numba.float32(0.0)
                    row[b] = row[b ^ low] + v
            total = numba.float32(0.0)
            for i in range(n_in):
                total += x[n, i]
            t = tenant[n]
            for o in numba.prange(n_out):
                acc = numba.float32(0.0)
                codes = packed[t, o]
                for j in range(n_bytes):
                    acc += lut[j, codes[j]]
                out[n, o] = 2 * acc - total

    return kernel


def multi_binary_matmul(x: torch.Tensor, packed: torch.Tensor, tenant: torch.Tensor, in_features: int
                        ) -> torch.Tensor:
    """Per-row binary matmul: on CUDA the Triton kernel, on CPU the numba kernel for up to
    :data:`KERNEL_MAX_ROWS` fp32 rows (decoding); otherwise the reference (prefill: unpack once
    per tenant, then a dense matmul)."""
    if x.is_cuda:
        from . import binary_triton
        if binary_triton.available():
            return binary_triton.multi_binary_matmul(x, packed, tenant.to(x.device), in_features).to(x.dtype)
    if not (available() and x.device.type == "cpu" and x.dtype == torch.float32 and packed.device.type == "cpu"
            and x.shape[0] <= KERNEL_MAX_ROWS):
        return multi_binary_matmul_reference(x, packed, tenant, in_features)
    out = torch.empty(x.shape[0], packed.shape[1], dtype=torch.float32)
    _kernel()(x.contiguous().numpy(), packed.contiguous().numpy(), tenant.to(torch.int64).contiguous().numpy(),
              out.numpy())
    return out


def binary_matmul(x: torch.Tensor, packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """``x @ sign^T`` for x (..., in): the CPU kernel when it applies, else the reference."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    tenant = torch.zeros(flat.shape[0], dtype=torch.int64)
    y = multi_binary_matmul(flat, packed[None], tenant, in_features)
    return y.reshape(*shape[:-1], packed.shape[0])
