"""Kernels for quantized matmuls, each tested against a plain-torch reference.

``aqlm_kernel_for(module, x, tokens)`` picks the kernel (``kernel(x, module)``) an ``AQLMLinear`` uses for input ``x``
(or None: the reference); RTN/GPTQ layers use :mod:`.quant` for fp32 CPU inputs.
:func:`use_reference` or ``LLMDEPLOY_KERNELS=reference`` (environment, read at import) forces the
plain-torch reference everywhere; ``LLMDEPLOY_AQLM_KERNEL=reference`` only for AQLM.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator

import torch

_FORCE_REFERENCE = False
#: read once at import: the layers check it on every call, and ``os.environ`` costs a microsecond
#: (use :func:`use_reference` to switch at run time)
_ENV_REFERENCE = os.environ.get("LLMDEPLOY_KERNELS", "auto") == "reference"
_ENV_AQLM_REFERENCE = os.environ.get("LLMDEPLOY_AQLM_KERNEL", "auto") == "reference"


@functools.cache
def importable(package: str) -> bool:
    """Whether a kernel backend's package (numba, triton) is installed."""
    return importlib.util.find_spec(package) is not None


@contextlib.contextmanager
def use_reference() -> Iterator[None]:
    """Within this block every quantized layer computes with its plain-torch reference."""
    global _FORCE_REFERENCE
    old, _FORCE_REFERENCE = _FORCE_REFERENCE, True
    try:
        yield
    finally:
        _FORCE_REFERENCE = old


def forced_reference() -> bool:
    """Whether :func:`use_reference` (or ``LLMDEPLOY_KERNELS=reference`` at import) asks for plain torch."""
    return _FORCE_REFERENCE or _ENV_REFERENCE


def row_call_buffers(x: torch.Tensor, bias: torch.Tensor | None, out_features: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What a C row kernel is handed: ``x`` contiguous, a new fp32 output (..., out_features),
    and the bias as contiguous fp32 (or None)."""
    if not x.is_contiguous():
        x = x.contiguous()
    out = torch.empty((*x.shape[:-1], out_features), dtype=torch.float32)
    if bias is not None and (bias.dtype is not torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().float().contiguous()
    return x, out, bias


def aqlm_kernel_for(module, x: torch.Tensor, tokens: int) -> Callable[[torch.Tensor, object], torch.Tensor] | None:
    """The fastest available kernel for ``module(x)``, called as ``kernel(x, module)``, or None for
    the reference. Called on every
    forward (~200 times per decoded token), so the CPU decode case is checked first and cheaply."""
    if _FORCE_REFERENCE or _ENV_REFERENCE or _ENV_AQLM_REFERENCE or module.out_group_size != 1:
        return None
    if x.is_cpu:
        if x.dtype is not torch.float32 or module._parameters["codebooks"].dtype is not torch.float32:
            return None
        aqlm_cpu = sys.modules.get(__name__ + ".aqlm_cpu")  # an import statement per call costs a microsecond
        if aqlm_cpu is None:
            from . import aqlm_cpu
        if tokens <= aqlm_cpu.GEMV_MAX_TOKENS and aqlm_cpu.available():
            return aqlm_cpu.aqlm_gemv
        if tokens > aqlm_cpu.GEMV_MAX_TOKENS and aqlm_cpu.c_available():
            return aqlm_cpu.aqlm_dequant_matmul
        return None
    if x.is_cuda:
        from . import aqlm_triton

        if not aqlm_triton.available() or not aqlm_triton.supports(module):
            return None  # the reference (decode + matmul) takes every shape
        if tokens <= aqlm_triton.GEMV_MAX_TOKENS:
            return aqlm_triton.aqlm_gemv
        return aqlm_triton.aqlm_dequant_matmul
    return None


__all__ = ["aqlm_kernel_for", "forced_reference", "importable", "row_call_buffers", "use_reference"]
