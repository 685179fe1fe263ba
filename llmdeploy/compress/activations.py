"""The calibration activations between two blocks: one tensor per batch, in memory or on disk.

At the protocol's 128 windows of 2048 tokens, one set of hidden states of a 4096-wide model is
4 GiB in float32, and the engine holds two (a block's inputs and its outputs). Spilled
(``folder`` given), each batch lives in its own safetensors file and is read back when used, so
the engine holds about one batch at a time; the values are bit-identical to the in-memory ones.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_KEY = "x"
_serial = itertools.count()


class ActivationStore:
    """A list of per-batch tensors (``append``, indexing, iteration, slice assignment), kept in
    memory or, with ``folder``, in files there (deleted by :meth:`release`)."""

    def __init__(self, items: Iterable[torch.Tensor] = (), *, folder: str | os.PathLike | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._tag = f"{os.getpid()}-{next(_serial)}-{uuid.uuid4().hex[:8]}"
        self._items: list[torch.Tensor | Path] = []
        for t in items:
            self.append(t)

    @property
    def spilled(self) -> bool:
        return self.folder is not None

    def like(self) -> ActivationStore:
        """An empty store kept the same way (same folder)."""
        return ActivationStore(folder=self.folder)

    def _put(self, t: torch.Tensor) -> torch.Tensor | Path:
        if self.folder is None:
            return t
        path = self.folder / f"act-{self._tag}-{len(self._items)}-{uuid.uuid4().hex[:6]}.safetensors"
        save_file({_KEY: t.detach().cpu().contiguous()}, str(path))
        return path

    @staticmethod
    def _get(item: torch.Tensor | Path) -> torch.Tensor:
        if isinstance(item, torch.Tensor):
            return item
        with safe_open(str(item), framework="pt") as f:
            return f.get_tensor(_KEY)

    def append(self, t: torch.Tensor) -> None:
        self._items.append(self._put(t))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._get(self._items[i])

    def __iter__(self) -> Iterator[torch.Tensor]:
        for item in self._items:
            yield self._get(item)

    def __setitem__(self, index: int | slice, value) -> None:
        if isinstance(index, slice):
            positions = range(len(self._items))[index]
            values = list(value)
            if len(values) != len(positions):
                raise ValueError("an ActivationStore's length cannot change through slice assignment")
            for p, v in zip(positions, values):
                self[p] = v
            return
        old = self._items[index]
        self._items[index] = self._put(value)
        if isinstance(old, Path):
            old.unlink(missing_ok=True)

    def release(self) -> None:
        """Forget every batch (and delete its file)."""
        for item in self._items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        self._items = []

    def __del__(self) -> None:  # a spilled store owns its files
        try:
            if self.folder is not None:
                self.release()
        except Exception:  # noqa: BLE001 - never raise from a finaliser (interpreter shutdown)
            pass

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> int:
        """Write every batch to ``folder/act-J.safetensors`` (for a resumable run); returns the count."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for j, item in enumerate(self._items):
            target = folder / f"act-{j}.safetensors"
            if isinstance(item, Path):  # already a file: link it rather than write it again
                try:
                    os.link(item, target)
                    continue
                except OSError:
                    pass
            save_file({_KEY: self._get(item).detach().cpu().contiguous()}, str(target))
        return len(self)

    @classmethod
    def load(cls, folder: str | os.PathLike, n: int, *, spill: str | os.PathLike | None = None,
             device: torch.device | str = "cpu") -> ActivationStore:
        """The ``n`` batches written by :meth:`save`, kept in memory (on ``device``) or spilled."""
        store = cls(folder=spill)
        for j in range(n):
            t = cls._get(Path(folder) / f"act-{j}.safetensors")
            store.append(t if spill is not None else t.to(device))
        return store
