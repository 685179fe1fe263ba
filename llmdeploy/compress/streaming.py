"""Streaming blocks: compress a model whose decoder blocks never sit in memory together.

The model is a *skeleton*: its embeddings, final norm and head are loaded, its decoder blocks
are on the ``meta`` device (shapes without storage). While the engine walks the blocks, a
:class:`BlockStream` fills block *i* from the source checkpoint (safetensors, sharded or not,
memory-mapped: only block *i*'s tensors are read), the method compresses it, the engine
propagates the calibration activations through it, and the stream writes the compressed block
to its own safetensors file and puts it back on ``meta``. Peak memory is the embeddings and head,
one block (plus the statistics the method keeps for it) and the calibration activations — which
:mod:`~llmdeploy.compress.activations` can spill to disk — whatever the model's depth.

:class:`EngineOptions` is how a driver (``llmdeploy.io.compress_streaming``, the CLI) tells the
engine to stream, spill, or checkpoint each finished block for resuming; methods do not see it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..errors import CheckpointError
from .distributed import is_main
from .files import replace_atomically, write_json_atomically
from .modules import compressed_modules

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_ATTR = "_llmdeploy_engine"


@dataclass
class EngineOptions:
    """How the engine runs a walk over the blocks (not what a method does).

    ``stream``: blocks come from and go to disk (see :class:`BlockStream`); ``spill_dir``: the
    calibration activations live in files there; ``checkpoint_dir`` + ``resume``: each finished
    block is checkpointed and an interrupted run continues at the next block."""

    stream: BlockStream | None = None
    spill_dir: str | None = None
    checkpoint_dir: str | None = None
    resume: bool = False
    walks: int = field(default=0, repr=False)

    def next_checkpoint_dir(self) -> Path | None:
        """A folder per walk (a method may walk the blocks more than once)."""
        if self.checkpoint_dir is None:
            return None
        self.walks += 1
        return Path(self.checkpoint_dir) / f"walk-{self.walks}"


def options(model: nn.Module) -> EngineOptions:
    """The engine options in force for ``model`` (defaults outside :func:`engine_options`)."""
    return model.__dict__.get(_ATTR) or EngineOptions()


@contextlib.contextmanager
def engine_options(model: nn.Module, **kwargs: Any) -> Iterator[EngineOptions]:
    """Run the engine's walks over ``model`` with these :class:`EngineOptions` inside the block."""
    previous = model.__dict__.get(_ATTR)
    opts = EngineOptions(**kwargs)
    model.__dict__[_ATTR] = opts
    try:
        yield opts
    finally:
        if previous is None:
            model.__dict__.pop(_ATTR, None)
        else:
            model.__dict__[_ATTR] = previous


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``). Called after
    every streamed block; no-op off glibc. See :func:`map_large_allocations`."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Serve allocations of ``threshold`` bytes or more from their own mappings (glibc's
    ``M_MMAP_THRESHOLD``), so that a freed block's weights go back to the system. By default
    glibc raises the threshold to the size of every large chunk freed, later blocks are carved
    from the heap, and the fragmented heap (and address space, which memory limits count) grows
    block after block. 1 MiB keeps the small temporaries of GPTQ's and SparseGPT's column loops
    on the heap (a mapping per temporary costs page faults). No-op off glibc."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def streaming(model: nn.Module) -> bool:
    """Whether ``model``'s blocks are being streamed from disk."""
    return options(model).stream is not None


class CheckpointReader:
    """The tensors of a safetensors checkpoint (one ``model.safetensors`` or shards listed in
    ``model.safetensors.index.json``), read one tensor at a time from memory-mapped files."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a safetensors index ({e})") from None
            self.files = {str(k): str(v) for k, v in weight_map.items()}
        elif (self.folder / SINGLE).exists():
            with safe_open(str(self.folder / SINGLE), framework="pt") as f:
                self.files = {k: SINGLE for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        else:
            raise CheckpointError(
                f"{self.folder} has no safetensors weights ({SINGLE} or {INDEX}); streaming reads "
                "safetensors only: save the model with safe_serialization (the default) first")
        self._handles: dict[str, Any] = {}

    def keys(self) -> set[str]:
        return set(self.files)

    def close(self) -> None:
        """Unmap every open shard: pages read through a mapping count as this process's resident
        memory for as long as it stays open."""
        self._handles.clear()

    #: shards kept open (memory-mapped) at once: a block's tensors lie in one or two shards, and
    #: a mapping costs address space (what a memory limit such as RLIMIT_DATA counts)
    open_shards = 2

    def _handle(self, file: str):
        if file in self._handles:
            self._handles[file] = self._handles.pop(file)  # most recently used last
            return self._handles[file]
        path = self.folder / file
        if not path.exists():
            raise CheckpointError(f"{self.folder} is incomplete: shard {file} is missing")
        while len(self._handles) >= self.open_shards:
            self._handles.pop(next(iter(self._handles)))
        self._handles[file] = safe_open(str(path), framework="pt")
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self.files[name]).get_tensor(name)

    def fingerprint(self) -> str:
        """A hash of every tensor's name, shape, dtype and first 64 values (read partially):
        what tells one source model from another when a run resumes."""
        h = hashlib.sha256()
        for name in sorted(self.files):
            sl = self._handle(self.files[name]).get_slice(name)
            shape = sl.get_shape()
            h.update(f"{name}{shape}{sl.get_dtype()}".encode())
            if shape:
                first = sl[: min(shape[0], 1)] if len(shape) > 1 else sl[: min(shape[0], 64)]
                h.update(first.flatten()[:64].float().numpy().tobytes())
        self.close()
        return h.hexdigest()

    def load_into(self, module: nn.Module, prefix: str, *, strict: bool = True) -> list[str]:
        """Fill ``module``'s parameters and buffers (on ``meta`` or not) with the tensors named
        ``prefix + name``, cast to the dtype the module holds (formats' own dtypes are kept by
        compressed modules). Returns the names that are not in the checkpoint; with ``strict``
        they are an error."""
        state = module.state_dict(keep_vars=True)
        loaded, missing = {}, []
        for k, ref in state.items():
            full = prefix + k
            if full not in self.files:
                missing.append(full)
                continue
            t = self.get(full)
            if tuple(t.shape) != tuple(ref.shape):
                raise CheckpointError(f"{self.folder}: {full} has shape {tuple(t.shape)}, the model expects "
                                      f"{tuple(ref.shape)}; the checkpoint does not match its config")
            if t.is_floating_point() and ref.is_floating_point() and t.dtype != ref.dtype:
                t = t.to(ref.dtype)
            loaded[k] = t
        if missing and strict:
            raise CheckpointError(f"{self.folder} lacks {len(missing)} tensor(s) of the model, e.g. {missing[:3]}")
        module.load_state_dict(loaded, strict=False, assign=True)
        return missing


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` in the safetensors format one tensor at a time, without the whole-file
    copy ``safetensors.torch.save_file`` builds in memory first (for a 70B model's embeddings,
    several GB at the end of a streamed run). The file reads back with any safetensors reader."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    items = sorted(tensors.items())
    for name, t in items:
        if t.dtype not in _DTYPES:
            raise ValueError(f"cannot write {name}: dtype {t.dtype} has no safetensors name")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for _, t in items:
            if t.numel():
                fh.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


def module_specs(block: nn.Module, prefix: str) -> dict[str, dict[str, Any]]:
    """``{qualified name: {"class", "init"}}`` of the compressed modules in ``block``."""
    return {f"{prefix}.{n}": {"class": type(m).__name__, "init": m.init_kwargs()}
            for n, m in compressed_modules(block).items()}


class ShardWriter:
    """Writes each finished block to its own safetensors file in ``folder`` and records, in
    ``blocks.json`` (replaced atomically after the file is complete), which tensors and which
    compressed modules each file holds: a run interrupted at any point knows its finished blocks."""

    RECORD = "blocks.json"

    def __init__(self, folder: str | os.PathLike, *, fresh: bool = True) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if fresh:
            for f in self.folder.glob("block-*.safetensors"):
                f.unlink()
            write_json_atomically(self.folder / self.RECORD, {})

    def written(self) -> dict[int, dict[str, Any]]:
        f = self.folder / self.RECORD
        if not f.exists():
            return {}
        try:
            return {int(k): v for k, v in json.loads(f.read_text()).items()}
        except (json.JSONDecodeError, ValueError) as e:
            raise CheckpointError(f"{f} is corrupt ({e}); delete {self.folder} to start over") from None

    def write_block(self, index: int, name: str, block: nn.Module) -> None:
        tensors: dict[str, torch.Tensor] = {}
        seen: set[tuple] = set()
        for k, v in block.state_dict().items():
            ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
            if ptr in seen:  # a tensor shared inside the block is stored once
                continue
            seen.add(ptr)
            tensors[f"{name}.{k}"] = v.detach().cpu().contiguous()
        file = f"block-{index:05d}.safetensors"
        replace_atomically(self.folder / file, lambda f: write_safetensors(f, tensors, metadata={"format": "pt"}))
        record = self.written()
        record[index] = {"file": file, "keys": sorted(tensors), "modules": module_specs(block, name)}
        write_json_atomically(self.folder / self.RECORD, {str(k): v for k, v in sorted(record.items())})


class BlockStream:
    """Blocks read from ``reader`` when the engine reaches them and, once finished, written by
    ``writer`` (rank 0 only; ``None`` to discard) and freed (moved back to ``meta``)."""

    def __init__(self, reader: CheckpointReader, writer: ShardWriter | None, prefix: str) -> None:
        self.reader, self.writer, self.prefix = reader, writer, prefix

    def load(self, index: int, block: nn.Module) -> None:
        self.reader.load_into(block, f"{self.prefix}.{index}.")
        self.reader.close()
        left = [n for n, t in block.state_dict(keep_vars=True).items() if t.is_meta]
        if left:
            raise CheckpointError(f"block {index} of {self.reader.folder} lacks {left[:3]}")

    def finish(self, index: int, block: nn.Module) -> None:
        if self.writer is not None and is_main():
            self.writer.write_block(index, f"{self.prefix}.{index}", block)
        block.to("meta")
        for m in compressed_modules(block).values():  # kernel layouts live outside the module's tensors
            for sub in m.modules():
                if hasattr(sub, "drop_derived_caches"):
                    sub.drop_derived_caches()
        return_freed_memory()

    def done(self) -> set[int]:
        """Blocks already written (by an interrupted run of the same step)."""
        return set(self.writer.written()) if self.writer is not None else set()
