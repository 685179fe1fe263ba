"""``SparseLinear``: a pruned linear stored compactly, so a saved sparse model is really smaller.

Two formats:

* ``bitmask``: one bit per weight (packed) plus the kept values in row-major order:
  ``1 + (1 − s)·b`` bits per weight for sparsity ``s`` and ``b``-bit values.
* ``nm``: for an N:M pattern, the kept values as an ``(out, in·N/M)`` matrix plus the position
  of each inside its group, ``ceil(log2 M)`` bits each (the layout of 2:4 sparse tensor cores):
  ``N/M·(b + ceil(log2 M))`` bits per weight. For 2:4 the metadata costs 1 bit per weight,
  like the bitmask; for 4:8 it would cost 1.5, so ``auto`` picks the bitmask there.

On CPU (fp32, no gradient) a layer is repacked once into the sparse kernel's layout
(:mod:`llmdeploy.kernels.sparse`: bitmask words + kept values, N:M included) and, on its first
forward, both the sparse kernel and a dense matvec are timed on it (interleaved, median of
several runs, weights evicted from the caches before each call as they are in a model); the
faster one serves every later call (``kernel_choice_``: ``"sparse"`` or ``"dense"``; the dense
choice keeps a dense fp32 copy of the weight, memory the saving was about, so it is taken only
where it measures 10% faster, :func:`llmdeploy.kernels.sparse.faster_path`). Elsewhere (GPU, other dtypes, training, or
``llmdeploy.kernels.use_reference()``) the dense weight is rebuilt and one dense matmul runs.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..compress.modules import CompressedModule, register_module
from ..kernels import forced_reference
from ..kernels import sparse as sparse_kernel
from ..kernels.opaque import opaque_forward
from ..quant.packing import pack, unpack
from ..quant.rtn import SUPPORTED_BITS, dequantize_groupwise, quantize_groupwise


def _pack_flat(codes: torch.Tensor, bits: int) -> torch.Tensor:
    flat = codes.flatten().to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return pack(flat, bits)


def _unpack_flat(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return unpack(packed, bits, n + (-n) % 8)[:n]


def _index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def best_format(n: int, m: int) -> str:
    """The smaller format for an N:M pattern (``m == 0``: unstructured, i.e. bitmask)."""
    return "nm" if m and n * _index_bits(m) <= m else "bitmask"


@register_module
class SparseLinear(CompressedModule):
    """A linear whose pruned weight is stored as a bitmask + values, or in N:M layout."""

    fixed_dtype_buffers = ("mask", "indices")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nnz: int,
        format: str = "bitmask",
        n: int = 0,
        m: int = 0,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if format not in ("bitmask", "nm"):
            raise ValueError(f"SparseLinear format must be 'bitmask' or 'nm', got {format!r}")
        if format == "nm" and not (0 < n < m and in_features % m == 0):
            raise ValueError(f"the 'nm' format needs 0 < n < m with m dividing in_features, got {n}:{m}")
        self.in_features, self.out_features = in_features, out_features
        self.format, self.n, self.m, self.nnz = format, n, m, nnz
        numel = in_features * out_features
        if format == "bitmask":
            self.register_buffer("mask", torch.zeros(-(-numel // 8), dtype=torch.uint8))
            self._init_values((nnz,), dtype)
            self.register_buffer("indices", None)
        else:
            kept = out_features * in_features // m * n
            bits = _index_bits(m)
            self.register_buffer("mask", None)
            self._init_values((out_features, in_features // m * n), dtype)
            self.register_buffer("indices", torch.zeros(-(-kept // 8) * bits, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    def _init_values(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Allocate the storage of the kept values (row-major order)."""
        self.register_buffer("values", torch.zeros(shape, dtype=dtype))

    def kept_values(self, dtype: torch.dtype) -> torch.Tensor:
        """The kept values in row-major order (flat for the bitmask, (out, in·N/M) for N:M)."""
        return self.values.to(dtype)

    quantizable: ClassVar[bool] = True

    def quantized(self, bits: int, group_size: int, symmetric: bool) -> SparseRTNLinear:
        """The same sparse layer with its kept values quantized round-to-nearest: groups of
        ``group_size`` consecutive kept values (row-major), one fp16 scale (and uint8 zero point)
        each. The mask is unchanged, so the zeros stay exactly zero."""
        mod = SparseRTNLinear(self.in_features, self.out_features, self.nnz, self.format, self.n, self.m,
                              bits=bits, group_size=group_size, symmetric=symmetric,
                              bias=self.bias is not None, dtype=self.values.dtype)
        mod.mask, mod.indices = self.mask, self.indices
        mod.set_values(self.values)
        if self.bias is not None:
            mod.bias.data.copy_(self.bias.data)
        return mod.to(self.values.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, n: int = 0, m: int = 0, format: str = "auto") -> SparseLinear:
        """Store ``linear``'s weight compactly; its zeros are the pruned entries.

        With ``format="nm"`` every group of ``m`` must hold at most ``n`` non-zeros.
        """
        w = linear.weight.detach()
        out_f, in_f = w.shape
        format = best_format(n, m) if format == "auto" else format
        if format == "bitmask":
            keep = w != 0
            mod = cls(in_f, out_f, int(keep.sum()), "bitmask", n, m, linear.bias is not None, w.dtype)
            mod.mask = _pack_flat(keep, 1)
            mod.values = w[keep].clone()
        else:
            groups = w.reshape(out_f, in_f // m, m)
            if int((groups != 0).sum(-1).max()) > n:
                raise ValueError(f"the weight has groups of {m} with more than {n} non-zeros: it is not {n}:{m} sparse")
            idx = torch.topk((groups != 0).to(torch.int8), n, dim=-1, sorted=False).indices.sort(-1).values
            mod = cls(in_f, out_f, out_f * in_f // m * n, "nm", n, m, linear.bias is not None, w.dtype)
            mod.values = torch.gather(groups, -1, idx).reshape(out_f, -1).clone()
            mod.indices = _pack_flat(idx, _index_bits(m))
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.data)
        return mod.to(w.device)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight with its zeros put back."""
        dtype = self.compute_dtype if dtype is None else dtype
        values = self.kept_values(dtype)
        out_f, in_f = self.out_features, self.in_features
        if self.format == "bitmask":
            keep = _unpack_flat(self.mask, 1, out_f * in_f).bool()
            w = torch.zeros(out_f * in_f, dtype=dtype, device=values.device)
            return w.masked_scatter_(keep, values.reshape(-1)).view(out_f, in_f)
        groups = in_f // self.m
        idx = _unpack_flat(self.indices, _index_bits(self.m), out_f * groups * self.n)
        idx = idx.view(out_f, groups, self.n).long()
        w = torch.zeros(out_f, groups, self.m, dtype=dtype, device=values.device)
        w.scatter_(-1, idx, values.reshape(out_f, groups, self.n))
        return w.view(out_f, in_f)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (for code that reads ``.weight``)."""
        return self.dense_weight()

    #: whether the CPU path may use the sparse kernel (a subclass whose values are not plain
    #: floats turns it off)
    sparse_kernel_ok: bool = True

    @opaque_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self._parameters.get("bias")
        if x.is_cpu and x.dtype is torch.float32 and self.sparse_kernel_ok and not forced_reference() and \
                not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))):
            plan = self._cpu_plan()
            if plan is not None:
                kw, dense = plan
                return sparse_kernel.sparse_matmul(x, kw, bias) if dense is None else F.linear(x, dense, bias)
        return F.linear(x, self.dense_weight(x.dtype), bias)

    def _cpu_plan(self) -> tuple[sparse_kernel.SparseKernelWeights, torch.Tensor | None] | None:
        """The kernel layout and, when the dense matvec measured faster, the dense weight; rebuilt
        when the stored values, mask or indices change. None when the kernel cannot serve."""
        b = self._buffers
        tensors = [b.get(k) for k in ("values", "mask", "indices")]
        key = tuple((t.data_ptr(), t._version) for t in tensors if t is not None)
        cached = self.__dict__.get("_cpu_plan_cache")
        if cached is None or cached[0] != key:
            if self.in_features % 16 or not sparse_kernel.available() or \
                    not all(t.is_cpu for t in tensors if t is not None):
                return None
            dense = self.dense_weight(torch.float32)
            kw = sparse_kernel.to_kernel_layout(self.keep_mask(), self.kept_values(torch.float32))
            choice = sparse_kernel.faster_path(kw, dense)
            self.kernel_choice_ = choice
            cached = (key, (kw, dense if choice == "dense" else None))
            self._cpu_plan_cache = cached
        return cached[1]

    def keep_mask(self) -> torch.Tensor:
        """Which weights are stored (out, in) bool: the bitmask, or the N:M positions."""
        out_f, in_f = self.out_features, self.in_features
        if self.format == "bitmask":
            return _unpack_flat(self.mask, 1, out_f * in_f).bool().view(out_f, in_f)
        groups = in_f // self.m
        idx = _unpack_flat(self.indices, _index_bits(self.m), out_f * groups * self.n).view(out_f, groups, self.n)
        keep = torch.zeros(out_f, groups, self.m, dtype=torch.bool, device=idx.device)
        return keep.scatter_(-1, idx.long(), True).view(out_f, in_f)

    def init_kwargs(self) -> dict[str, Any]:
        return dict(in_features=self.in_features, out_features=self.out_features, nnz=self.nnz,
                    format=self.format, n=self.n, m=self.m, bias=self.bias is not None)

    def nominal_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        pat = f", {self.n}:{self.m}" if self.m else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format}{pat}, nnz={self.nnz}")


@register_module
class SparseRTNLinear(SparseLinear):
    """A pruned linear whose kept values are also quantized (SparseGPT's joint sparse + quantized
    setting): the mask (or N:M indices) of :class:`SparseLinear` plus packed ``bits``-bit codes of
    the kept values in groups of ``group_size`` consecutive kept values, each with an fp16 scale
    and (asymmetric) a uint8 zero point. Bits per weight: ``1 + (1 − s)·(bits + 24/group_size)``
    for the bitmask."""

    fixed_dtype_buffers = ("mask", "indices", "qvalues", "scales", "zeros")

    def __init__(self, in_features: int, out_features: int, nnz: int, format: str = "bitmask", n: int = 0,
                 m: int = 0, *, bits: int = 4, group_size: int = 64, symmetric: bool = False, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        if bits not in SUPPORTED_BITS or group_size < 1:
            raise ValueError(f"SparseRTNLinear needs bits in {SUPPORTED_BITS} and group_size >= 1")
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self._dtype = dtype
        super().__init__(in_features, out_features, nnz, format, n, m, bias, dtype)

    def _padded(self, count: int) -> int:
        step = math.lcm(self.group_size, 8)
        return -(-count // step) * step

    def _init_values(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self._values_shape = shape
        count = math.prod(shape)
        padded = self._padded(count)
        groups = padded // self.group_size
        self.register_buffer("qvalues", torch.zeros(1, padded * self.bits // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(1, groups, dtype=torch.float16))
        self.register_buffer("zeros", None if self.symmetric else torch.zeros(1, groups, dtype=torch.uint8))

    def set_values(self, values: torch.Tensor) -> None:
        """Quantize and store the kept values (row-major)."""
        flat = values.detach().reshape(-1).to(torch.float32)
        padded = self._padded(flat.numel())
        flat = torch.cat([flat, flat.new_zeros(padded - flat.numel())]).view(1, -1)
        q, scale, zero = quantize_groupwise(flat, self.bits, self.group_size, self.symmetric)
        self.qvalues = pack(q, self.bits)
        self.scales = scale
        if not self.symmetric:
            self.zeros = zero

    def kept_values(self, dtype: torch.dtype) -> torch.Tensor:
        count = math.prod(self._values_shape)
        padded = self.qvalues.shape[1] * 8 // self.bits
        zeros = self.zeros if self.zeros is not None else torch.full_like(
            self.scales, 2 ** (self.bits - 1), dtype=torch.uint8)
        w = dequantize_groupwise(unpack(self.qvalues, self.bits, padded), self.scales, zeros, self.group_size, dtype)
        return w[0, :count].reshape(self._values_shape)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else self._dtype

    sparse_kernel_ok = False  # the kernel reads fp32 values; these are codes (dense rebuild instead)

    quantizable: ClassVar[bool] = False

    def quantized(self, bits: int, group_size: int, symmetric: bool) -> None:
        return None  # already quantized

    def init_kwargs(self) -> dict[str, Any]:
        return dict(super().init_kwargs(), bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits}, group_size={self.group_size}"
