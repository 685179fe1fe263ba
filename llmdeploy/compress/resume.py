"""Checkpoints of a walk over the blocks, so that an interrupted run continues at the next block.

After block *i* is finished the engine writes, in this order: the block (its tensors, unless a
stream already wrote them, and the classes and arguments of its compressed modules), the
calibration activations that are block *i+1*'s inputs, what the method carries from block to
block (``ctx.carry``: SliceGPT's rotation) and its report so far, and finally ``progress``
naming all of it, replaced atomically. Resuming restores blocks ``0..i`` without recomputing
them and starts at block *i+1* on the saved activations: the result equals an uninterrupted run.

Several processes (:mod:`~llmdeploy.compress.distributed`) each save their own activations and
progress; the run resumes at the block every process has finished (the last two states are
kept, so processes interrupted one block apart still agree). A folder holding another run's
state (other settings, model, data or number of processes) is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from .activations import ActivationStore
from .distributed import barrier, world
from .files import replace_atomically
from .streaming import module_specs


def _split_carry(carry: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {k: v.detach().cpu().contiguous() for k, v in carry.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in carry.items() if not isinstance(v, torch.Tensor)}
    try:
        json.dumps(rest)
    except TypeError as e:
        raise CheckpointError(f"the method's carried state must be tensors or JSON values ({e})") from None
    return tensors, rest


class BlockCheckpoint:
    """The checkpoint folder of one walk (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, fingerprint: str, *, resume: bool, save_blocks: bool) -> None:
        self.folder = Path(folder)
        self.rank, self.size = world()
        self.fingerprint = f"{fingerprint}-w{self.size}"
        self.save_blocks = save_blocks
        self.folder.mkdir(parents=True, exist_ok=True)
        if not resume:
            self._clear()
        barrier()

    @property
    def _progress(self) -> Path:
        return self.folder / f"progress-rank{self.rank}.json"

    def _clear(self) -> None:
        for p in self.folder.glob(f"*rank{self.rank}*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if self.rank == 0:
            for p in self.folder.glob("block-*.safetensors"):
                p.unlink()

    def _read(self) -> dict[str, Any] | None:
        if not self._progress.exists():
            return None
        try:
            data = json.loads(self._progress.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self._progress} is corrupt ({e}); delete {self.folder} to start over") from None
        if data.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"{self.folder} holds the progress of a different run (other settings, model, "
                                  "calibration data or number of processes); delete it or run without resuming")
        return data

    def load(self) -> dict[str, Any] | None:
        """The state to resume from — ``{"done", "modules", "carry", "report", "acts", "n_batches"}``
        — or None when nothing was finished."""
        data = self._read()
        states = {int(k): v for k, v in (data or {}).get("states", {}).items()}
        done = max(states, default=0)
        if self.size > 1:
            t = torch.tensor([done], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            done = int(t.item())
        if done == 0:
            return None
        if done not in states:
            raise CheckpointError(f"{self.folder}: the processes stopped more than one block apart; delete it to "
                                  "start over")
        state = dict(states[done])
        carry = dict(state.get("carry", {}))
        tfile = self.folder / state["carry_tensors"]
        if tfile.exists():
            carry.update(load_file(str(tfile)))
        state["carry"] = carry
        state["done"] = done
        state["acts"] = self.folder / state["acts"]
        return state

    def restore_values(self, index: int, block: nn.Module) -> None:
        """Put block ``index``'s saved tensors into ``block`` (whose structure is already restored)."""
        f = self.folder / f"block-{index}.safetensors"
        try:
            tensors = load_file(str(f))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise CheckpointError(f"{f} cannot be read ({e}); delete {self.folder} to start over") from None
        block.load_state_dict(tensors, strict=True)

    def save(self, index: int, name: str, block: nn.Module, outputs: ActivationStore, carry: dict[str, Any],
             report: dict[str, Any] | None, modules: dict[int, dict[str, Any]]) -> None:
        """Record block ``index`` finished; ``outputs`` are block ``index + 1``'s inputs."""
        done = index + 1
        if self.save_blocks and self.rank == 0:
            tensors = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
            replace_atomically(self.folder / f"block-{index}.safetensors", lambda f: save_file(tensors, f))
        acts = f"acts-rank{self.rank}-{done}"
        tmp = self.folder / f".{acts}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        n = outputs.save(tmp)
        shutil.rmtree(self.folder / acts, ignore_errors=True)
        os.replace(tmp, self.folder / acts)
        tensors, rest = _split_carry(carry)
        carry_file = f"carry-rank{self.rank}-{done}.safetensors"
        replace_atomically(self.folder / carry_file, lambda f: save_file(tensors, f))
        modules = {**modules, index: module_specs(block, name)}
        data = self._read() or {"fingerprint": self.fingerprint, "states": {}}
        states = {int(k): v for k, v in data["states"].items()}
        states[done] = {"acts": acts, "n_batches": n, "carry": rest, "carry_tensors": carry_file,
                        "report": report, "modules": {str(k): v for k, v in modules.items()}}
        keep = sorted(states)[-2:]
        data["states"] = {str(k): states[k] for k in keep}
        replace_atomically(self._progress, lambda f: Path(f).write_text(json.dumps(data)))
        for k in states:
            if k not in keep:
                shutil.rmtree(self.folder / states[k]["acts"], ignore_errors=True)
                (self.folder / states[k]["carry_tensors"]).unlink(missing_ok=True)

