"""A teacher's next-token distributions for distillation losses: on the fly, or cached as top-k.

Two ways to give a training stage the teacher's view of each calibration window:

* **on the fly**: the teacher model runs on every micro-batch (a second model in memory);
* **cached top-k** (:class:`TopKCache`): the teacher runs once over the windows before training;
  for every position its ``k`` largest log-probabilities and their token ids are stored in
  memory-mapped files (``N x T x k`` float32 + int32: 128 windows of 512 tokens at k=64 take
  25 MB, against 12.9 GB for SmolLM2's full 49,152-token distributions), and the teacher can
  be freed.

With the cache, losses compare the two distributions *coarsened* to the teacher's top-k tokens
plus one bucket holding the rest of the mass (teacher: ``1 − Σ top-k``; student: its own mass
outside those tokens; :func:`llmdeploy.distill.losses.coarsen`): exact for that coarsening, never
above the full KL, equal to it when k is the vocabulary size. The cache is made at one
temperature (log-probabilities of ``logits / T``), part of its fingerprint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..compress.base import Compressor, engine_field
from ..errors import CheckpointError, ConfigError
from ..finetune.full import heldout_perplexity

log = logging.getLogger(__name__)


def _fingerprint(teacher: nn.Module, windows: torch.Tensor, k: int, temperature: float) -> str:
    h = hashlib.sha256()
    h.update(f"k={k};T={temperature};{tuple(windows.shape)}".encode())
    h.update(windows.cpu().contiguous().numpy().tobytes())
    for name, p in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().flatten()[:64].cpu().numpy().tobytes())
    return h.hexdigest()


class TopKCache:
    """The teacher's top-``k`` log-probabilities (at ``temperature``) and token ids for every
    position of ``windows``, memory-mapped from ``folder`` (a temporary folder, removed by :meth:`close`, when None).
    A folder holding the cache of the same teacher, windows and k is reused as it is."""

    def __init__(self, teacher: nn.Module, windows: torch.Tensor, k: int, folder: str | os.PathLike | None = None,
                 batch_size: int = 1, temperature: float = 1.0) -> None:
        vocab = teacher.get_output_embeddings().weight.shape[0]
        self.k = min(k, vocab)
        self.temperature = temperature
        self._temporary = folder is None
        self.path = Path(tempfile.mkdtemp(prefix="llmdeploy-topk-") if folder is None else folder)
        self.path.mkdir(parents=True, exist_ok=True)
        n, t = windows.shape
        shape = (n, t, self.k)
        meta = {"fingerprint": _fingerprint(teacher, windows, self.k, temperature), "shape": list(shape)}
        meta_file = self.path / "topk.json"
        if not (meta_file.exists() and json.loads(meta_file.read_text()) == meta):
            self._compute(teacher, windows, shape, batch_size)
            meta_file.write_text(json.dumps(meta))
        self.logp = np.memmap(self.path / "topk_logp.f32", dtype=np.float32, mode="r", shape=shape)
        self.ids = np.memmap(self.path / "topk_ids.i32", dtype=np.int32, mode="r", shape=shape)

    def _compute(self, teacher: nn.Module, windows: torch.Tensor, shape: tuple[int, int, int], batch_size: int) -> None:
        device = next(teacher.parameters()).device
        logp = np.memmap(self.path / "topk_logp.f32", dtype=np.float32, mode="w+", shape=shape)
        ids = np.memmap(self.path / "topk_ids.i32", dtype=np.int32, mode="w+", shape=shape)
        was = teacher.training
        teacher.eval()
        try:
            with torch.no_grad():
                for s in tqdm(range(0, shape[0], batch_size), desc="teacher top-k", leave=False):
                    out = teacher(input_ids=windows[s:s + batch_size].to(device), use_cache=False).logits
                    v, i = torch.topk(F.log_softmax(out.float() / self.temperature, dim=-1), self.k, dim=-1)
                    logp[s:s + batch_size] = v.cpu().numpy()
                    ids[s:s + batch_size] = i.to(torch.int32).cpu().numpy()
        finally:
            teacher.train(was)
        logp.flush()
        ids.flush()
        del logp, ids

    def __getitem__(self, rows: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities, token ids) of the windows ``rows``, each (len(rows), T, k)."""
        idx = np.asarray(rows if not isinstance(rows, torch.Tensor) else rows.cpu().numpy())
        try:
            return torch.from_numpy(np.ascontiguousarray(self.logp[idx])), \
                torch.from_numpy(np.ascontiguousarray(self.ids[idx]))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"the teacher cache in {self.path} cannot be read ({e}); delete it") from None

    def close(self) -> None:
        """Release the maps; a temporary folder is deleted. Closing twice is harmless."""
        self.logp = self.ids = None
        if self._temporary and self.path.exists():
            for f in self.path.iterdir():
                f.unlink()
            self.path.rmdir()


@dataclass(kw_only=True)
class TeacherStage(Compressor):
    """Base of the training stages that learn from a teacher (PV-Tuning, Distill): the teacher
    settings, and the engine options every such stage has (teacher, cache folder, held-out
    windows, checkpoints, device).

    In a recipe the default teacher is the model as the recipe received it: ``Compose`` calls
    :meth:`before_recipe` before its first step, and the stage keeps a copy of the model — or,
    with ``teacher_top_k``, runs it once over the calibration windows and keeps only its top-k
    log-probabilities (:class:`TopKCache`), so that no second model stays in memory. Subclasses
    say whether they use it (:meth:`uses_start`) and at which temperature it is cached.
    """

    teacher_top_k: int | None = None
    gradient_checkpointing: bool = True
    seed: int = 0
    teacher_model: nn.Module | list | None = engine_field(None, repr=False)
    teacher_cache: str | None = engine_field(None)
    eval_windows: torch.Tensor | None = engine_field(None, repr=False)
    eval_every: int = engine_field(0)
    checkpoint_dir: str | None = engine_field(None)
    resume: bool = engine_field(False)
    save_every: int = engine_field(25)
    device: str | None = engine_field(None)
    needs_calibration = True
    supports_resume = True
    _start = None  # the recipe's starting model, or its top-k cache, kept by before_recipe

    def uses_start(self) -> bool:
        """Whether this stage learns from the recipe's starting model."""
        return self.teacher_model is None

    def check_settings(self) -> None:
        """Errors in the settings alone (before any work, even before a recipe's first step)."""
        name = self.method
        if self.teacher_top_k is not None and self.teacher_top_k < 1:
            raise ConfigError(f"{name}: teacher_top_k must be >= 1 or None (the full distribution on the fly)")
        if self.resume and not self.checkpoint_dir:
            raise ConfigError(f"{name}: resume=True needs checkpoint_dir")
        if self.eval_every and self.eval_windows is None:
            raise ConfigError(f"{name}: eval_every needs eval_windows (held-out token windows)")

    def before_recipe(self, model: nn.Module, calib: torch.Tensor | None) -> None:
        self.check_settings()
        if not self.uses_start() or calib is None:
            return
        if self.teacher_top_k is not None:
            self._start = TopKCache(model, calib, self.teacher_top_k, self.teacher_cache,
                                    getattr(self, "microbatch_size", 1), getattr(self, "temperature", 1.0))
        else:
            self._start = copy.deepcopy(model).eval().requires_grad_(False)

    def check_teacher_vocabulary(self, teacher: nn.Module, model: nn.Module) -> None:
        tv = teacher.get_output_embeddings().weight.shape[0]
        sv = model.get_output_embeddings().weight.shape[0]
        if tv != sv:
            raise ConfigError(f"{self.method}: the teacher's vocabulary ({tv}) differs from the student's ({sv}); "
                              "teachers must share the tokenizer")

    def evaluate(self, model: nn.Module, step: int, report) -> None:
        """Held-out perplexity of the current student on ``eval_windows``, into ``report``."""
        report.eval_steps.append(step)
        report.eval_ppl.append(heldout_perplexity(model, self.eval_windows, getattr(self, "microbatch_size", 1)))
        log.info("%s step %d: held-out ppl %.3f", self.method, step, report.eval_ppl[-1])

    def end_of_step(self, step: int, loss: float, model: nn.Module, report, save: Callable[[int], None] | None,
                    seconds: Callable[[], float]) -> None:
        """After step ``step`` (0-based) of ``self.steps``: record and log the loss, evaluate every
        ``eval_every`` steps, and checkpoint (``save(done_steps)``) every ``save_every`` steps and at
        the end, with ``report.seconds`` brought up to date (``seconds()``) first."""
        done = step + 1
        report.history.append(loss)
        if step % 10 == 0 or done == self.steps:
            log.info("%s step %d/%d: loss %.4f", self.method, done, self.steps, loss)
        if self.eval_every and (done % self.eval_every == 0 or done == self.steps):
            self.evaluate(model, done, report)
        if save is not None and (done % self.save_every == 0 or done == self.steps):
            report.seconds = seconds()
            save(done)

    def release_start(self, keep: TopKCache | None = None) -> None:
        """Drop the kept starting model (close its cache), once the stage has run."""
        if isinstance(self._start, TopKCache) and self._start is not keep:
            self._start.close()
        self._start = None
