"""Dynamic int8 quantization: int8 weights (per output channel, symmetric) and activations
quantized per token at run time, multiplied in integer arithmetic (int32 accumulation).

On CPUs with AVX512-VNNI, or AVX2 for up to ``AVX2_MAX_ROWS`` token rows, the layer runs the C
kernel of :mod:`llmdeploy.kernels.int8` (bit-identical to the torch path below, which stays the
reference and the fallback)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..compress.base import Compressor, register_method, require_targets
from ..compress.modules import CompressedModule, register_module
from ..kernels import forced_reference
from ..kernels import int8 as int8_kernel
from ..kernels.opaque import opaque_forward
from ..models.adapters import get_adapter

QMAX = 127


def quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each row: ``x ≈ q · s`` with ``|x - q·s| <= s/2``."""
    x = x.to(torch.float32)
    scale = (x.abs().amax(-1, keepdim=True) / QMAX).clamp_min(1e-12)
    q = torch.round(x / scale).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


# 1024 * 127**2 < 2**24: an fp32 dot product of up to 1024 int8 pairs is an exact integer,
# whatever the summation order, since every partial sum is an integer below 2**24.
_EXACT_K = 1024


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a @ b_t.T`` for int8 operands, exactly, as int32.

    On CUDA this is ``torch._int_mm`` (int8 tensor cores). On CPU, torch's int8/int32 matmuls
    are several times slower than fp32 GEMM, so the product runs as fp32 GEMMs over chunks of
    at most 1024 columns (each exact, see ``_EXACT_K``) summed in int32: same integers, faster.
    """
    m, k = a.shape
    n = b_t.shape[0]
    if a.is_cuda and hasattr(torch, "_int_mm") and m > 16 and k % 8 == 0 and n % 8 == 0:
        return torch._int_mm(a, b_t.t())
    af, bf = a.to(torch.float32), b_t.to(torch.float32)
    out = None
    for start in range(0, k, _EXACT_K):
        part = (af[:, start : start + _EXACT_K] @ bf[:, start : start + _EXACT_K].t()).to(torch.int32)
        out = part if out is None else out + part
    return out


@register_module
class DynamicInt8Linear(CompressedModule):
    """A linear with an int8 weight and per-channel fp32 scales; activations are quantized per
    token when it runs, and the product is computed in integers."""

    fixed_dtype_buffers = ("qweight", "wscale")

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("wscale", torch.ones(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DynamicInt8Linear:
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None,
                  dtype=linear.weight.dtype)
        q, s = quantize_per_row(linear.weight.detach())
        mod.qweight, mod.wscale = q, s.squeeze(-1)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.data)
        return mod.to(linear.weight.device)

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.to(torch.float32) * self.wscale.unsqueeze(-1)

    def _kernel_weights(self) -> int8_kernel.W8A8Weights | None:
        """The weight prepared for the kernel (:func:`llmdeploy.kernels.int8.prepare`), again only
        when it changes; None when the weight is not on the CPU."""
        b = self._buffers  # not the attributes: nn.Module's __getattr__ costs a microsecond each
        q, s = b["qweight"], b["wscale"]
        key = (q.data_ptr(), q._version, s.data_ptr(), s._version)
        cached = self.__dict__.get("_kernel_cache")
        if cached is None or cached[0] != key:
            if not (q.is_cpu and s.is_cpu):
                return None
            cached = (key, int8_kernel.prepare(q, s))
            self._kernel_cache = cached
        return cached[1]

    @opaque_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the decode path is called ~200 times per token: every check here is a cheap one
        if x.is_cpu and x.dtype is torch.float32 and not forced_reference() and \
                not (torch.is_grad_enabled() and x.requires_grad) and int8_kernel.serves(x.numel() // self.in_features):
            w = self._kernel_weights()
            if w is not None:
                return int8_kernel.apply(x, w, self._parameters.get("bias"))
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        xq, xs = quantize_per_row(x2)
        acc = int8_matmul(xq, self.qweight)
        y = acc.to(torch.float32) * xs * self.wscale.unsqueeze(0)
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def init_kwargs(self) -> dict[str, Any]:
        return dict(in_features=self.in_features, out_features=self.out_features,
                    bias=self.bias is not None)

    def nominal_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 w8a8-dynamic"


@register_method("dynamic_int8")
@dataclass(kw_only=True)
class DynamicInt8(Compressor):
    """W8A8 dynamic quantization of every decoder-block linear still dense."""

    def targets(self, model: nn.Module) -> list[str]:
        """The dense decoder-block linears; raises ConfigError when there are none."""
        names, skipped = [], {}
        for n in get_adapter(model).linear_names():
            mod = model.get_submodule(n)
            if isinstance(mod, nn.Linear):
                names.append(n)
            else:
                skipped[n] = f"they are already compressed ({type(mod).__name__})"
        require_targets("dynamic_int8", names, skipped)
        return names

    def validate(self, model: nn.Module) -> None:
        self.targets(model)

    def apply(self, model: nn.Module, calib: torch.Tensor | None = None) -> nn.Module:
        names = self.targets(model)
        from .rtn import QuantReport

        self.report_ = QuantReport(quantized={n: [8, -1] for n in names})
        for name in tqdm(names, desc="dynamic int8", leave=False):
            model.set_submodule(name, DynamicInt8Linear.from_linear(model.get_submodule(name)))
        return model
