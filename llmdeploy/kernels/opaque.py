"""Compressed modules as opaque operators under ``torch.compile``.

The CPU kernels of this library are C functions called through ctypes with per-module plans of
pointers; TorchDynamo cannot trace them, and a graph break at each of a model's ~200 compressed
linears would hand most of the Python overhead back. So, while a graph is being traced, a
compressed module calls one registered custom operator, ``llmdeploy::module_call(x, handle,
out_features)``, instead of its kernel: the graph holds an opaque call whose output shape the
fake implementation gives, and at run time the operator calls the module's own eager forward
(kernel dispatch and all). ``handle`` names the module in a registry of weak references, given
when the module is built or copied (:func:`register`).
Inference only: the operator has no autograd formula, and modules route inputs that need
gradients through their differentiable path before ever reaching it.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable

import torch

from ..errors import ConfigError

_MODULES: weakref.WeakValueDictionary[int, torch.nn.Module] = weakref.WeakValueDictionary()
_NEXT = itertools.count(1)


def register(module: torch.nn.Module) -> int:
    """Give ``module`` its own handle (at construction and when unpickled or copied, so that traced
    code only reads the attribute ``_opaque_handle``)."""
    h = next(_NEXT)
    module.__dict__["_opaque_handle"] = h
    _MODULES[h] = module
    return h


_LIB = torch.library.Library("llmdeploy", "DEF")
_LIB.define("module_call(Tensor x, int handle, int out_features) -> Tensor")


def _module_call(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """The eager forward of the compressed module registered as ``handle`` (its hooks, if any, were
    traced around the operator by TorchDynamo, so they are not run again here)."""
    module = _MODULES.get(handle)
    if module is None:
        raise ConfigError(f"a compiled graph calls compressed module #{handle}, which no longer exists; compile the "
                          "model again after replacing its modules")
    return type(module).forward.__wrapped__(module, x)


# the low-level registration: a Python kernel behind the dispatcher is cheap to call, where a
# torch.library.custom_op wrapper costs an order of magnitude more per call (a model makes ~200)
for _key in ("CPU", "CUDA"):
    _LIB.impl("module_call", lambda x, handle, out_features: _module_call(x, handle, out_features), _key)


@torch.library.register_fake("llmdeploy::module_call")
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


module_call = torch.ops.llmdeploy.module_call.default


def traced() -> bool:
    """Whether ``torch.compile`` is tracing the caller right now (not ``torch.export``: an exported
    program must hold the module's own operations, e.g. the ONNX exporter's MatMulNBits)."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()


def opaque_forward(forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
                   ) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    """Decorator for a compressed module's ``forward(x)``: while traced by ``torch.compile`` and
    not building an autograd graph, the call becomes ``llmdeploy::module_call``; otherwise the
    forward runs as written. The module needs ``out_features`` and ``_needs_autograd(x)``."""

    def wrapped(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if traced() and not self._needs_autograd(x):
            return module_call(x, self.__dict__["_opaque_handle"], self.out_features)
        return forward(self, x)

    wrapped.__wrapped__ = forward
    wrapped.__doc__ = forward.__doc__
    wrapped.__name__ = forward.__name__
    return wrapped
