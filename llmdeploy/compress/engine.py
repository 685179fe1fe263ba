"""The block-wise calibration engine shared by every layer-wise method (GPTQ-style).

It walks the decoder blocks in order: the inputs of block 0 are captured for every calibration
window (with whatever the block needs: attention mask, position embeddings...), a callback may
transform block i (accumulating per-linear statistics such as XᵀX through hooks), and then the
*compressed* block's outputs become block i+1's inputs. Only one block sits on the compute
device at a time; the activations may stay on another device (CPU by default).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CalibrationDataError
from ..models.adapters import ModelAdapter, get_adapter

log = logging.getLogger(__name__)


_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache")


class StopForward(Exception):
    """Raised by a capturing hook once it has what it needs: the rest of the forward is skipped
    (see :func:`run_until_stop`)."""


@contextlib.contextmanager
def hooks(*specs: tuple[nn.Module, str, Callable]) -> Iterator[None]:
    """Register forward hooks for the duration of a ``with`` block, removed even on error.

    Each spec is ``(module, kind, fn)`` with kind ``"pre"`` (``fn(module, args)``), ``"pre_kw"``
    (``fn(module, args, kwargs)``) or ``"post"`` (``fn(module, args, output)``).
    """
    handles = []
    try:
        for module, kind, fn in specs:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(fn))
            elif kind == "pre_kw":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            elif kind == "post":
                handles.append(module.register_forward_hook(fn))
            else:
                raise ValueError(f"unknown hook kind {kind!r}")
        yield
    finally:
        for h in handles:
            h.remove()


def run_until_stop(fn: Callable[[], Any]) -> None:
    """Call ``fn`` without gradients; a :class:`StopForward` raised inside ends it quietly."""
    with torch.no_grad():
        try:
            fn()
        except StopForward:
            pass


def to_device(obj: Any, device: torch.device | str, float_dtype: torch.dtype | None = None) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device`` (and floating tensors to
    ``float_dtype`` when given)."""
    if isinstance(obj, torch.Tensor):
        if float_dtype is not None and obj.is_floating_point():
            return obj.to(device, float_dtype)
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, float_dtype) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, float_dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, float_dtype) for k, v in obj.items()}
    return obj


@dataclass
class LinearStats:
    """Second-moment statistics of a linear's inputs: ``xtx = Σ xᵀx`` over ``n_rows`` rows."""

    xtx: torch.Tensor
    n_rows: int = 0

    @property
    def hessian(self) -> torch.Tensor:
        """``2/n · XᵀX``, the Hessian of the layer-wise squared error (GPTQ's convention)."""
        return self.xtx * (2.0 / max(self.n_rows, 1))


@dataclass
class BlockContext:
    """What a callback sees of block ``index``: the block, its inputs, and helpers to run it."""

    index: int
    name: str
    block: nn.Module
    adapter: ModelAdapter
    inputs: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    device: torch.device
    extras: dict[str, Any] = field(default_factory=dict)

    def forward(self, block: nn.Module | None = None) -> list[torch.Tensor]:
        """Run ``block`` (default: this block) on every input batch; outputs stay where inputs live."""
        block = self.block if block is None else block
        outs = []
        with torch.no_grad():
            for x, kw in zip(self.inputs, self.kwargs):
                out = block(x.to(self.device), **to_device(kw, self.device))
                outs.append(self.adapter.block_output(out).to(x.device))
        return outs

    def linears(self) -> dict[str, nn.Linear]:
        """The block's linears by path relative to the block."""
        return self.adapter.block_linears(self.block)

    def collect_stats(self, names: Iterable[str] | None = None) -> dict[str, LinearStats]:
        """Run the block once with hooks and return XᵀX of each named linear's input (float32)."""
        linears = self.linears()
        names = list(linears) if names is None else list(names)
        stats: dict[str, LinearStats] = {}
        specs = []
        for n in names:
            lin = linears[n]
            stats[n] = LinearStats(
                torch.zeros(lin.in_features, lin.in_features, device=self.device, dtype=torch.float32)
            )

            def hook(_mod, args, _out, s=stats[n]):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
                s.xtx.addmm_(x.T, x)
                s.n_rows += x.shape[0]

            specs.append((lin, "post", hook))
        with hooks(*specs):
            self.forward()
        return stats

    def input_moments(self, module: nn.Module, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``Σ xᵀx`` of ``module``'s input over every calibration batch, on the CPU; each pass
        stops at ``module`` (the rest of the block is not run)."""
        acc: list[torch.Tensor] = []

        def hook(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).to(dtype)
            xtx = (x.T @ x).cpu()
            if acc:
                acc[0] += xtx
            else:
                acc.append(xtx)
            raise StopForward

        with hooks((module, "pre", hook)):
            for x, kw in zip(self.inputs, self.kwargs):
                run_until_stop(lambda x=x, kw=kw: self.block(x.to(self.device), **to_device(kw, self.device)))
        return acc[0]


def capture_block_inputs(
    model: nn.Module,
    calib: torch.Tensor,
    adapter: ModelAdapter,
    *,
    batch_size: int,
    device: torch.device,
    store_device: torch.device,
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Inputs (hidden states and keyword arguments) of block 0 for every calibration batch."""
    blocks = adapter.blocks()
    inputs: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []

    def hook(_mod, args, kw):
        kw = dict(kw)
        hidden = args[0] if args else kw.pop("hidden_states")
        inputs.append(hidden.detach().to(store_device))
        # No KV cache while calibrating: each block is re-run on the same inputs.
        kw = {k: v for k, v in kw.items() if k not in _CACHE_KWARGS}
        kwargs.append(to_device(kw, store_device))
        raise StopForward

    with hooks((blocks[0], "pre_kw", hook)):
        for start in range(0, calib.shape[0], batch_size):
            ids = calib[start : start + batch_size].to(device)
            run_until_stop(lambda ids=ids: model(input_ids=ids, use_cache=False))
    return inputs, kwargs


def _move_outside_blocks(
    model: nn.Module, adapter: ModelAdapter, device: torch.device | dict[str, torch.device]
) -> dict[str, torch.device]:
    """Move every parameter/buffer outside the decoder blocks to ``device`` (one device, or a
    mapping name -> device as returned before); return where they were."""
    prefix = adapter.blocks_prefix()
    where: dict[str, torch.device] = {}
    for name, mod in model.named_modules():
        if name == prefix or name.startswith(prefix + "."):
            continue
        for pname, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            key = f"{name}.{pname}"
            where[key] = p.device
            target = device.get(key, p.device) if isinstance(device, dict) else device
            if p.device != target:
                if isinstance(p, nn.Parameter):
                    p.data = p.data.to(target)
                else:
                    mod._buffers[pname] = p.to(target)
    return where


def run_blockwise(
    model: nn.Module,
    calib: torch.Tensor,
    process: Callable[[BlockContext], None] | None = None,
    *,
    device: torch.device | str | None = None,
    store_device: torch.device | str = "cpu",
    batch_size: int = 8,
    desc: str = "blocks",
    record_inputs: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Walk the decoder blocks with calibration windows ``calib`` (n_samples, seq_len).

    ``process(ctx)`` may modify ``ctx.block`` in place (replace linears, prune...). Afterwards
    the modified block's outputs are propagated to the next block. Returns the last block's
    outputs, one tensor per batch. If ``record_inputs`` is a list, every block's input batches
    are appended to it (for tests and diagnostics).
    """
    adapter = get_adapter(model)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    store_device = torch.device(store_device)
    blocks = adapter.blocks()
    block_devices = [next(b.parameters()).device for b in blocks]
    was_training = model.training
    model.eval()
    outside = _move_outside_blocks(model, adapter, device)
    try:
        blocks[0].to(device)
        inputs, kwargs = capture_block_inputs(
            model, calib, adapter, batch_size=batch_size, device=device, store_device=store_device
        )
        blocks[0].to(block_devices[0])
        prefix = adapter.blocks_prefix()
        for i in tqdm(range(len(blocks)), desc=desc, leave=False):
            block = blocks[i]
            for x in inputs:
                if not torch.isfinite(x).all():
                    raise CalibrationDataError(
                        f"the inputs of block {i} contain NaN or inf: the model (or a compressor "
                        "applied to an earlier block) produced non-finite activations on the "
                        "calibration data"
                    )
            if record_inputs is not None:
                record_inputs.append(torch.cat(inputs))
            block.to(device)
            ctx = BlockContext(i, f"{prefix}.{i}", block, adapter, inputs, kwargs, device)
            if process is not None:
                process(ctx)
            inputs = ctx.forward(blocks[i])  # the (possibly replaced) block's outputs
            blocks[i].to(block_devices[i])
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:  # the model is left where it was, also after an error
        _move_outside_blocks(model, adapter, outside)
        model.train(was_training)
    return inputs
