"""Sign-bit (1-bit) matrices: packing and the matmul ``x · sign(Δ)ᵀ`` (BitDelta's deltas).

Signs are packed 8 per byte along the input dimension, bit ``k`` of byte ``j`` holding input
``8j + k`` (1 = +1, 0 = −1; a zero delta counts as +1). Since ``x·s = 2·Σ_{bit=1} x − Σ x``, the
C kernel (``csrc/binary.c``, built on first use, see :mod:`.native`) computes each output as a
masked sum where two packed bytes are the AVX-512 lane mask of 16 inputs (with AVX2, a broadcast
byte tested per lane): one bit per weight is what it reads, instead of 32. The numba kernel (used where no C compiler is) builds per token a
lookup table of the 256 partial sums of every 8 inputs and reads ``in/8`` table entries per
output. Both take a tenant index per row, so one call applies a different delta to each row of a
batch; both are checked against :func:`binary_matmul_reference`.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import importable

#: above this many rows the numba kernel's table per row costs more than unpacking the signs once
KERNEL_MAX_ROWS = 16
#: the C kernel's crossover with unpack-then-matmul (576x1536 on 2 cores: 1.8 ms vs 16 ms at 64
#: rows, even at about 512)
NATIVE_MAX_ROWS = 256
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
        # lut[n, j, b] = sum of the inputs 8j+k of row n whose bit k is set in b: built by doubling
        # (the entries with bit k set are those without it plus input 8j+k), 255 adds per byte
        lut = np.empty((n_rows, n_bytes, 256), np.float32)
        for q in numba.prange(n_rows * n_bytes):
            n, j = q // n_bytes, q % n_bytes
            row = lut[n, j]
            row[0] = 0.0
            for k in range(8):
                idx = 8 * j + k
                v = x[n, idx] if idx < n_in else numba.float32(0.0)
                half = 1 << k
                for b in range(half):
                    row[half + b] = row[b] + v
        total = np.empty(n_rows, np.float32)
        for n in range(n_rows):
            t = numba.float32(0.0)
            for i in range(n_in):
                t += x[n, i]
            total[n] = t
        for o in numba.prange(n_out):  # one parallel region for every row: rows differ only in table and codes
            for n in range(n_rows):
                codes = packed[tenant[n], o]
                table = lut[n]
                acc = numba.float32(0.0)
                for j in range(n_bytes):
                    acc += table[j, codes[j]]
                out[n, o] = 2 * acc - total[n]

    return kernel


def _native():
    import ctypes

    from .native import function
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    return function("binary", "multi_binary_matmul", (p, p, p, p, i64, i64, i64, i64, i64, ctypes.c_int), ctypes.c_int)


def _native_merge():
    import ctypes

    from .native import function
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    return function("binary", "merge_signs", (p, p, ctypes.c_float, p, i64, i64, i64, ctypes.c_int), None)


def merge_signs(weight: torch.Tensor, packed: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``weight + scale · sign`` (out, in): one tenant's dense weight; ``scale`` is one number or
    one per output row (the C kernel for one number and fp32 CPU tensors, else torch)."""
    fn = _native_merge()
    if isinstance(scale, torch.Tensor) and scale.dim():
        return weight + scale.to(weight.dtype)[:, None] * unpack_signs(packed, weight.shape[1], weight.dtype)
    scale = float(scale)
    if (fn is None or weight.dtype != torch.float32 or weight.device.type != "cpu"
            or packed.device.type != "cpu"):
        return weight + scale * unpack_signs(packed, weight.shape[1], weight.dtype)
    w, packed = weight.detach().contiguous(), packed.contiguous()
    out = torch.empty_like(w)
    fn(w.data_ptr(), packed.data_ptr(), float(scale), out.data_ptr(), w.shape[0], w.shape[1], packed.shape[1],
       torch.get_num_threads())
    return out


def multi_binary_linear(x: torch.Tensor, base: torch.nn.Linear, packed: torch.Tensor, scales: torch.Tensor,
                        tenant: torch.Tensor) -> torch.Tensor:
    """``base(x[n]) + scales[t] · x[n] · sign_tᵀ`` for row ``n`` of tenant ``t = tenant[n]``
    (x: N, in; ``scales``: (T,), or (T, out) for one scale per output row). Up to :data:`NATIVE_MAX_ROWS` rows (decoding): the base matmul once for all rows
    plus the per-row sign matmul. More rows (long prefills) on CPU: per tenant the merged weight
    ``W_base + α_t·S_t`` (:func:`merge_signs`) and one dense matmul of that tenant's rows, which
    costs one dense pass instead of two; equal up to float rounding."""
    in_features = base.in_features
    if x.shape[0] <= NATIVE_MAX_ROWS or x.is_cuda:
        y = base(x)
        s = scales[tenant]
        d = multi_binary_matmul(x.float(), packed, tenant, in_features) * (s if s.dim() == 2 else s[:, None])
        return y + d.to(y.dtype)
    out = x.new_empty(x.shape[0], base.out_features)
    for t in torch.unique(tenant).tolist():
        rows = (tenant == t).nonzero(as_tuple=True)[0]
        w = merge_signs(base.weight, packed[t], scales[t])
        out[rows] = torch.nn.functional.linear(x[rows], w.to(x.dtype), base.bias)
    return out


def native_available() -> bool:
    """Whether the C kernel (AVX-512 masked adds, or AVX2 lane masks, where the CPU has them) built on this machine."""
    return _native() is not None


def multi_binary_matmul_native(x: torch.Tensor, packed: torch.Tensor, tenant: torch.Tensor,
                               in_features: int) -> torch.Tensor:
    """The C kernel (``csrc/binary.c``): fp32 CPU rows, any number of them."""
    fn = _native()
    if fn is None:
        raise RuntimeError("the native binary kernel is not built here (no C compiler or LLMDEPLOY_NATIVE=0)")
    if x.dtype != torch.float32 or packed.dtype != torch.uint8 or x.device.type != "cpu" or packed.device.type != "cpu":
        raise ValueError(f"the native kernel takes fp32 CPU rows and uint8 CPU signs, got {x.dtype} on {x.device} "
                         f"and {packed.dtype} on {packed.device}")
    x = x.contiguous()
    packed = packed.contiguous()
    tenant = tenant.to(torch.int64).contiguous()
    if x.shape[1] != in_features or packed.shape[2] != -(-in_features // 8):
        raise ValueError(f"x has {x.shape[1]} inputs and the signs {packed.shape[2]} bytes per row, "
                         f"expected {in_features} and {-(-in_features // 8)}")
    out = torch.empty(x.shape[0], packed.shape[1], dtype=torch.float32)
    rc = fn(x.data_ptr(), packed.data_ptr(), tenant.data_ptr(), out.data_ptr(), x.shape[0], in_features,
            packed.shape[1], packed.shape[2], packed.shape[0], torch.get_num_threads())
    if rc == -1:
        raise IndexError(f"tenant indices must lie in [0, {packed.shape[0]}), got {tenant.tolist()}")
    if rc != 0:
        raise MemoryError("the binary matmul kernel could not allocate its row sums")
    return out


def multi_binary_matmul(x: torch.Tensor, packed: torch.Tensor, tenant: torch.Tensor, in_features: int
                        ) -> torch.Tensor:
    """Per-row binary matmul. CUDA: the Triton kernel. CPU, fp32: the C kernel for up to
    :data:`NATIVE_MAX_ROWS` rows, else the numba kernel for up to :data:`KERNEL_MAX_ROWS`;
    otherwise (prefill of long prompts) the reference: unpack once per tenant, then a dense matmul."""
    if x.is_cuda:
        from . import binary_triton
        if binary_triton.available():
            return binary_triton.multi_binary_matmul(x, packed, tenant.to(x.device), in_features).to(x.dtype)
    cpu_fp32 = x.device.type == "cpu" and x.dtype == torch.float32 and packed.device.type == "cpu"
    if cpu_fp32 and x.shape[0] <= NATIVE_MAX_ROWS and native_available():
        return multi_binary_matmul_native(x, packed, tenant, in_features)
    if not (cpu_fp32 and available() and x.shape[0] <= KERNEL_MAX_ROWS):
        return multi_binary_matmul_reference(x, packed, tenant, in_features)
    out = torch.empty(x.shape[0], packed.shape[1], dtype=torch.float32)
    _kernel()(x.contiguous().numpy(), packed.contiguous().numpy(), tenant.to(torch.int64).contiguous().numpy(),
              out.numpy())
    return out
