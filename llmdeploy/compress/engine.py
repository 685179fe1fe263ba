"""The block-wise calibration engine shared by every layer-wise method (GPTQ-style).

It walks the decoder blocks in order: the inputs of block 0 are captured for every calibration
window (with whatever the block needs: attention mask, position embeddings...), a callback may
transform block i (accumulating per-linear statistics such as XᵀX through hooks), and then the
*compressed* block's outputs become block i+1's inputs. Only one block sits on the compute
device at a time; the activations may stay on another device (CPU by default).

Because every calibrated method walks the blocks here, they all gain what the engine does
besides: blocks streamed from disk and written as they finish (:mod:`.streaming`), activations
spilled to disk (:mod:`.activations`), a checkpoint after every block (:mod:`.resume`),
calibration windows shared by several processes with their statistics summed
(:mod:`.distributed`), and blocks computed on the device they were placed on (``device="map"``,
for models loaded with an accelerate device map: the engine moves activations, not blocks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CalibrationDataError, ConfigError, UnsupportedArchitectureError
from ..models.adapters import ModelAdapter, get_adapter
from .activations import ActivationStore
from .distributed import all_reduce_, all_reduce_int, shard_windows, world
from .modules import MODULES
from .resume import BlockCheckpoint
from .state import run_fingerprint
from .streaming import module_specs as ckpt_specs
from .streaming import options

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
    """What a callback sees of block ``index``: the block, its inputs, and helpers to run it.

    ``carry`` is what a method hands from one block to the next (tensors or JSON values); it is
    checkpointed with each finished block, so a resumed run gets it back. Statistics gathered
    through :meth:`collect_stats`, :meth:`input_moments` or :meth:`reduce` are summed over every
    process of a distributed run; a method that sums something else itself must call
    :meth:`reduce` on it."""

    index: int
    name: str
    block: nn.Module
    adapter: ModelAdapter
    inputs: ActivationStore
    kwargs: list[dict[str, Any]]
    device: torch.device
    extras: dict[str, Any] = field(default_factory=dict)
    #: (block type, linears) -> which linear shares its input with an earlier one, learned by
    #: :meth:`collect_stats` and shared by the blocks of one walk (one model)
    plans: dict[tuple, dict[str, str]] = field(default_factory=dict)
    carry: dict[str, Any] = field(default_factory=dict)

    def _run(self, block: nn.Module, keep: bool) -> ActivationStore | None:
        outs = self.inputs.like() if keep else None
        with torch.no_grad():
            for x, kw in zip(self.inputs, self.kwargs):
                out = block(x.to(self.device), **to_device(kw, self.device))
                if outs is not None:
                    outs.append(self.adapter.block_output(out).to(x.device))
        return outs

    def forward(self, block: nn.Module | None = None) -> ActivationStore:
        """Run ``block`` (default: this block) on every input batch; outputs stay where inputs
        live (in memory or spilled, like the inputs)."""
        return self._run(self.block if block is None else block, keep=True)

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the processes of a distributed run, in place (identity alone)."""
        return all_reduce_(t)

    def linears(self) -> dict[str, nn.Linear]:
        """The block's linears by path relative to the block."""
        return self.adapter.block_linears(self.block)

    def collect_stats(self, names: Iterable[str] | None = None) -> dict[str, LinearStats]:
        """Run the block with hooks and return XᵀX of each named linear's input (float32), summed
        over every calibration window (of every process).

        The first pass over a block of a new type (in this walk) learns its plan: whether each named linear runs
        exactly once per forward, and which ones are fed the very same input tensor (q/k/v,
        gate/up). With such a plan, linears sharing an input share one :class:`LinearStats`
        (computed once), and each pass stops as soon as all of them have run — for the first group
        of a block, the attention and the MLP are skipped."""
        linears = self.linears()
        names = list(linears) if names is None else list(names)
        key = (type(self.block), tuple(names))
        plan = self.plans.get(key)  # (alias: linear -> owner of the same input) or None: plain
        stats = {n: LinearStats(torch.zeros(linears[n].in_features, linears[n].in_features, device=self.device,
                                            dtype=torch.float32)) for n in names}
        seen: list[tuple[torch.Tensor, str]] = []  # this pass's inputs, in call order
        calls: dict[str, int] = {}
        learned: dict[str, str] = {}

        def hook(_mod, args, _out, n):
            x = args[0]
            owner = next((o for t, o in seen if t is x and o != n), None)
            seen.append((x, n))
            calls[n] = calls.get(n, 0) + 1
            if plan is None:
                if owner is not None:
                    learned.setdefault(n, owner)
            elif plan.get(n) != owner:
                raise UnsupportedArchitectureError(
                    f"{self.name}.{n}: which linears share an input changed between forwards of "
                    f"{type(self.block).__name__}; the block must run the same way on every batch")
            if plan is None or n not in plan:
                s, xf = stats[n], x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                s.xtx.addmm_(xf.T, xf)
                s.n_rows += xf.shape[0]
            if plan is not None and len(calls) == len(names):
                raise StopForward  # every named linear has its input: the rest is not needed

        specs = [(linears[n], "post", lambda m, a, o, n=n: hook(m, a, o, n)) for n in names]
        with hooks(*specs):
            for x, kw in zip(self.inputs, self.kwargs):
                seen.clear()
                calls.clear()
                run_until_stop(lambda x=x, kw=kw: self.block(x.to(self.device), **to_device(kw, self.device)))
                if plan is None and sorted(calls) == sorted(names) and all(c == 1 for c in calls.values()):
                    # a full pass showed the plan; the owners' statistics already hold this pass
                    # for their sharers (the same tensor), so the sharers' own sums are dropped
                    plan = self.plans[key] = dict(learned)
        shared = plan or {}
        for n, s in stats.items():
            if n not in shared:
                all_reduce_(s.xtx)
                s.n_rows = all_reduce_int(s.n_rows)
        for n, owner in shared.items():
            stats[n] = stats[owner]
        return stats

    def input_moments(self, module: nn.Module, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``Σ xᵀx`` of ``module``'s input over every calibration batch (of every process), on the
        CPU; each pass stops at ``module`` (the rest of the block is not run)."""
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
        return all_reduce_(acc[0])


def capture_block_inputs(
    model: nn.Module,
    calib: torch.Tensor,
    adapter: ModelAdapter,
    *,
    batch_size: int,
    device: torch.device,
    store_device: torch.device,
    spill_dir: str | None = None,
) -> tuple[ActivationStore, list[dict[str, Any]]]:
    """Inputs (hidden states and keyword arguments) of block 0 for every calibration batch (the
    block itself never runs: a hook stops the forward as it is entered)."""
    blocks = adapter.blocks()
    inputs = ActivationStore(folder=spill_dir)
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


def _home(module: nn.Module) -> torch.device:
    """Where a module's tensors live (the first parameter's or buffer's device; CPU if none)."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


def _compute_device(model: nn.Module) -> torch.device:
    """The device of the model's first materialised parameter (a streamed model's blocks are on meta)."""
    for p in model.parameters():
        if not p.is_meta:
            return p.device
    return torch.device("cpu")


def _restore_block(index: int, name: str, block: nn.Module, specs: dict[str, Any],
                   restore: Callable[[int, nn.Module, dict[str, Any]], None] | None, carry: dict[str, Any],
                   ckpt: BlockCheckpoint | None) -> None:
    """Give a finished block back its compressed structure (the method's ``restore`` hook, then
    the compressed modules the checkpoint names) and, in memory, its saved tensors."""
    if restore is not None:
        restore(index, block, carry)
    for qname, spec in specs.items():
        path = qname[len(name) + 1:]
        old = block.get_submodule(path)
        cls = MODULES.get(spec["class"])
        if cls is None:
            raise ConfigError(f"the checkpoint names module class {spec['class']!r}, unknown to this llmdeploy")
        dtype = next((p.dtype for p in old.parameters() if p.is_floating_point()), torch.float32)
        block.set_submodule(path, cls(**spec["init"], dtype=dtype).to(_home(old)))
    if ckpt is not None:
        ckpt.restore_values(index, block)


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
    finish: Callable[[BlockContext], None] | None = None,
    key: dict[str, Any] | None = None,
    report: Any = None,
    restore: Callable[[int, nn.Module, dict[str, Any]], None] | None = None,
    carry: dict[str, Any] | None = None,
) -> ActivationStore:
    """Walk the decoder blocks with calibration windows ``calib`` (n_samples, seq_len).

    ``process(ctx)`` may modify ``ctx.block`` in place (replace linears, prune...). Afterwards
    the modified block's outputs are propagated to the next block, then ``finish(ctx)`` may
    change the block's storage without changing what it computes (compact sparse layers). Returns
    the last block's outputs, one tensor per batch. If ``record_inputs`` is a list, every block's
    input batches are appended to it (for tests and diagnostics).

    ``device``: where blocks are computed (default: the model's first parameter's device), or
    ``"map"``: each block where it was placed (a model loaded with an accelerate device map).

    A walk can be checkpointed after every block (:func:`~llmdeploy.compress.streaming.engine_options`
    with ``checkpoint_dir``) when the method passes ``key`` (its settings, what a resumed run must
    match), its ``report`` dataclass (saved and restored with the blocks) and, if a finished block
    has a structure its compressed modules alone do not rebuild, ``restore(index, block, carry)``.
    ``carry`` (a dict, updated in place) is every block's ``ctx.carry``: what the method hands on.
    """
    opts = options(model)
    stream = opts.stream
    adapter = get_adapter(model)
    mapped = isinstance(device, str) and device == "map"
    if mapped and stream is not None:
        raise ConfigError("device='map' computes each block where it was placed; a streamed model's blocks are "
                          "loaded from disk onto one device: pass a device (or none)")
    compute = _compute_device(model) if device is None or mapped else torch.device(device)
    store_device = torch.device(store_device)
    blocks = adapter.blocks()
    prefix = adapter.blocks_prefix()
    homes = [_home(b) for b in blocks]
    if mapped and any(h.type == "meta" for h in homes):
        raise ConfigError("device='map': some blocks are offloaded (their weights are not on any device); "
                          "compress such a model with llmdeploy.compress_streaming, which loads one block at a time")
    calib = shard_windows(calib)
    ckpt = None
    ckpt_dir = opts.next_checkpoint_dir()
    if ckpt_dir is not None:
        if key is None:
            raise ConfigError(f"{desc} cannot checkpoint its walk over the blocks: run it without a checkpoint folder")
        fingerprint = run_fingerprint(key, model, calib, extra=stream.reader.fingerprint() if stream else "")
        ckpt = BlockCheckpoint(ckpt_dir, fingerprint, resume=opts.resume,
                               save_blocks=stream is None)
    was_training = model.training
    model.eval()
    outside = None if mapped else _move_outside_blocks(model, adapter, compute)
    try:
        inputs, kwargs = capture_block_inputs(model, calib, adapter, batch_size=batch_size, device=compute,
                                              store_device=store_device, spill_dir=opts.spill_dir)
        start, modules = 0, {}
        carry = {} if carry is None else carry
        state = ckpt.load() if ckpt is not None and opts.resume else None
        if state is not None:
            start = state["done"]
            carry.update(state["carry"])
            modules = {int(k): v for k, v in state["modules"].items()}
            if report is not None and state.get("report") is not None:
                for k, v in state["report"].items():
                    setattr(report, k, v)
            for i in range(start):
                _restore_block(i, f"{prefix}.{i}", blocks[i], modules.get(i, {}), restore, carry,
                               ckpt if stream is None else None)
            inputs.release()
            inputs = ActivationStore.load(state["acts"], state["n_batches"], spill=opts.spill_dir, device=store_device)
            log.info("%s: resuming at block %d of %d from %s", desc, start, len(blocks), ckpt.folder)
        plans: dict[tuple, dict[str, str]] = {}  # collect_stats' plans, per block type (this model)
        for i in tqdm(range(start, len(blocks)), desc=desc, leave=False, disable=world()[0] != 0):
            block = blocks[i]
            for x in inputs:
                if not torch.isfinite(x).all():
                    raise CalibrationDataError(
                        f"the inputs of block {i} contain NaN or inf: the model (or a compressor "
                        "applied to an earlier block) produced non-finite activations on the "
                        "calibration data"
                    )
            if record_inputs is not None:
                record_inputs.append(torch.cat(list(inputs)))
            if stream is not None:
                stream.load(i, block)
            dev = homes[i] if mapped else compute
            if not mapped:
                block.to(dev)
            ctx = BlockContext(i, f"{prefix}.{i}", block, adapter, inputs, kwargs, dev, carry=carry, plans=plans)
            if process is not None:
                process(ctx)
            outputs = ctx.forward(blocks[i])  # the (possibly replaced) block's outputs
            if finish is not None:
                finish(ctx)
            if stream is not None:  # written (and freed) before the checkpoint calls it finished
                stream.finish(i, blocks[i])
            if ckpt is not None:
                ckpt.save(i, f"{prefix}.{i}", blocks[i], outputs, carry,
                          dataclasses.asdict(report) if report is not None else None, modules)
                modules[i] = ckpt_specs(blocks[i], f"{prefix}.{i}")
            if stream is None and not mapped:
                blocks[i].to(homes[i])
            inputs.release()
            inputs = outputs
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    finally:  # the model is left where it was, also after an error
        if outside is not None:
            _move_outside_blocks(model, adapter, outside)
        model.train(was_training)
    return inputs


def walk_blocks(model: nn.Module, fn: Callable[[int, str, nn.Module], None], *, desc: str = "blocks") -> None:
    """Call ``fn(index, name, block)`` on every decoder block, for methods that need no
    calibration (RTN, magnitude pruning): a streamed model's blocks are loaded before and written
    and freed after, exactly as in :func:`run_blockwise`."""
    stream = options(model).stream
    adapter = get_adapter(model)
    prefix = adapter.blocks_prefix()
    for i, block in enumerate(tqdm(adapter.blocks(), desc=desc, leave=False, disable=world()[0] != 0)):
        if stream is not None:
            stream.load(i, block)
        fn(i, f"{prefix}.{i}", block)
        if stream is not None:
            stream.finish(i, block)
