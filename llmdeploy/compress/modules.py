"""Base of the modules llmdeploy puts in place of dense ones, and their registry.

A compressed module knows the keyword arguments that rebuild it empty (``init_kwargs``), so a
saved checkpoint can be restored module for module, then filled from safetensors. Buffers whose
dtype is part of the storage format (packed codes, fp16 scales) keep it under ``model.to(dtype)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from ..kernels import opaque

MODULES: dict[str, type[CompressedModule]] = {}
#: readers of Hugging Face checkpoints whose ``quantization_config.quant_method`` a method of
#: llmdeploy owns: ``quant_method -> loader(path, dtype) -> model`` (see ``register_hf_loader``)
HF_LOADERS: dict[str, Callable[..., nn.Module]] = {}


def register_hf_loader(quant_method: str) -> Callable:
    """Decorator: ``llmdeploy.load`` reads HF directories of ``quant_method`` with this function."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        HF_LOADERS[quant_method] = fn
        return fn

    return deco


def register_module(cls: type[CompressedModule]) -> type[CompressedModule]:
    """Make ``cls`` restorable from a checkpoint by its class name."""
    MODULES[cls.__name__] = cls
    return cls


class CompressedModule(nn.Module):
    """A module that stores a compressed form of a dense layer."""

    #: buffers whose dtype belongs to the storage format and must survive ``.to(dtype)``
    fixed_dtype_buffers: ClassVar[tuple[str, ...]] = ()
    #: attributes holding caches derived from the storage (kernel layouts, measured plans; some
    #: hold ctypes pointers): rebuilt on first use, so never copied or pickled
    #: (a subclass whose kernels keep others adds their names; tests/test_module_copy.py checks that
    #: every attribute a forward adds is listed)
    derived_caches: ClassVar[tuple[str, ...]] = ("_kernel_cache", "_kernel_layout_ok", "_cpu_plan_cache")

    def __init__(self) -> None:
        super().__init__()
        opaque.register(self)  # torch.compile sees it as one opaque operator (llmdeploy.kernels.opaque)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in (*self.derived_caches, "_opaque_handle"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        opaque.register(self)  # a copy is a module of its own

    def _needs_autograd(self, x: torch.Tensor) -> bool:
        """Whether this call must be differentiable (kernels have no backward): grad mode is on and
        the input or one of the module's own tensors requires a gradient. Subclasses on a hot path
        check just the tensors that can."""
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(t is not None and t.requires_grad
                                      for t in (*self._parameters.values(), *self._buffers.values()))

    def drop_derived_caches(self) -> None:
        """Forget the caches derived from the storage (a streamed block is freed this way too)."""
        for name in self.derived_caches:
            self.__dict__.pop(name, None)

    def init_kwargs(self) -> dict[str, Any]:
        """JSON-serialisable keyword arguments that rebuild this module (with empty storage)."""
        raise NotImplementedError

    def nominal_params(self) -> int:
        """Parameters of the dense layer this module replaces (the denominator of bits/param)."""
        raise NotImplementedError

    #: :meth:`quantized` returns a module (checked by planners without doing the work, which
    #: may be on the ``meta`` device while blocks are streamed)
    quantizable: ClassVar[bool] = False

    def quantized(self, bits: int, group_size: int, symmetric: bool) -> CompressedModule | None:
        """This module with its stored values quantized round-to-nearest (a sparse layer keeps its
        mask), or None when its format cannot take a further quantization (already quantized)."""
        return None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The continuous parameters a fine-tuning stage may train without changing the storage
        format (AQLM's codebooks and scales); the bias is the caller's to choose."""
        return []

    def bind(self, model: nn.Module) -> None:
        """Called by the loader once every module of ``model`` is in place: a module that reads
        another's storage (a head tied to a quantized embedding) finds it here. Default: nothing."""

    def storage_bits(self) -> int:
        """Bits actually held: every parameter and buffer of this module, at its stored dtype."""
        tensors = list(self.parameters(recurse=False)) + list(self.buffers(recurse=False))
        return sum(t.numel() * t.element_size() * 8 for t in tensors)

    def _apply(self, fn, recurse: bool = True):  # noqa: D401 - torch hook
        fixed = {n: self._buffers[n] for n in self.fixed_dtype_buffers if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, old in fixed.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:  # a dtype cast: keep the stored format, follow the device
                self._buffers[name] = old.to(device=new.device)
        return self


def compressed_modules(model: nn.Module) -> dict[str, CompressedModule]:
    """The outermost compressed modules of ``model`` by qualified name (a compressed module that
    wraps another, such as LoRA adapters over a quantized linear, stands for both)."""
    out: dict[str, CompressedModule] = {}
    for n, m in model.named_modules():
        if isinstance(m, CompressedModule) and not any(n.startswith(p + ".") for p in out):
            out[n] = m
    return out

