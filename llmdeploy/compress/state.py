"""Resumable training state: tensors, optimizer state and progress, each file replaced atomically.

A training stage (full fine-tuning, PV-Tuning, distillation) writes, every few steps, a folder
``step-N`` with ``tensors.safetensors`` (what it trains) and ``optimizer.pt`` (optimizer and
scheduler state: tensors and numbers only, read back with ``weights_only=True``), then
``progress.json`` (step, that folder, fingerprint of the run, histories), replaced atomically:
``progress.json`` always names a complete state, so an interruption while saving loses at most
the steps since the previous save. A folder holding another run's state (other settings, model
or data) is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from .base import Report
from .files import replace_atomically


@dataclass
class TrainingReport(Report):
    """What every training stage records: the loss per step, held-out perplexity at chosen steps,
    wall time, and the step a resumed run started from."""

    history: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_ppl: list[float] = field(default_factory=list)
    seconds: float = 0.0
    resumed_at: int = 0

    def trend(self) -> str:
        """``loss a -> b (means of the first/last k steps)`` plus the held-out perplexity's ends."""
        k = max(1, len(self.history) // 10)
        first, last = sum(self.history[:k]) / k, sum(self.history[-k:]) / k
        s = f"loss {first:.4f} -> {last:.4f} (means of the first/last {k} steps)"
        if self.eval_ppl:
            s += f"; held-out ppl {self.eval_ppl[0]:.2f} -> {self.eval_ppl[-1]:.2f}"
        return s


def run_fingerprint(config: dict[str, Any], model: torch.nn.Module, calib: torch.Tensor, extra: str = "") -> str:
    """A hash of what determines a run's result — its settings, the calibration windows, the
    model's tensors (names, shapes and their first 64 values; only names and shapes for tensors on
    ``meta``, whose values ``extra`` stands for: a streamed model's source checkpoint) — so a
    checkpoint folder of another run is refused instead of resumed."""
    h = hashlib.sha256(extra.encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(calib.cpu().contiguous().numpy().tobytes())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        if not t.is_meta:
            h.update(t.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()


class TrainingState:
    """The checkpoint folder of one training run (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, fingerprint: str, who: str) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.who = who


    def save(self, step: int, tensors: dict[str, torch.Tensor], optimizer: dict[str, Any],
             progress: dict[str, Any]) -> None:
        """Write the state after ``step`` steps (tensors are copied to the CPU first): tensors and
        optimizer into a new folder ``step-N``, then ``progress.json`` naming it (atomically), then
        the older folders are removed — an interruption at any point leaves one complete state."""
        cpu = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
        folder = self.path / f"step-{step}"
        folder.mkdir(exist_ok=True)
        replace_atomically(folder / "tensors.safetensors", lambda f: save_file(cpu, f))
        replace_atomically(folder / "optimizer.pt", lambda f: torch.save(optimizer, f))
        data = {"fingerprint": self.fingerprint, "step": step, "folder": folder.name, **progress}
        replace_atomically(self.path / "progress.json", lambda f: Path(f).write_text(json.dumps(data)))
        for old in self.path.glob("step-*"):
            if old.name != folder.name and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)

    def load(self) -> tuple[int, dict[str, torch.Tensor], dict[str, Any], dict[str, Any]] | None:
        """(step, tensors, optimizer state, progress) of the last save, or None when there is none."""
        f = self.path / "progress.json"
        if not f.exists():
            return None
        try:
            progress = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{f} is corrupt ({e}); delete {self.path} to start over") from None
        if progress.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"{self.path} holds a different {self.who} run (other settings, model or data); "
                                  "delete it or pass resume=False")
        folder = self.path / str(progress.pop("folder", ""))
        try:
            tensors = load_file(str(folder / "tensors.safetensors"))
            optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
        except Exception as e:  # noqa: BLE001 - safetensors and torch raise several types
            raise CheckpointError(f"{self.path} cannot be restored ({e}); delete it to start over") from None
        return int(progress.pop("step")), tensors, optimizer, progress
