"""``evaluate``: one call that measures a model every way the harness knows, into one result
object that serialises to JSON and renders as a Markdown row."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..compress.base import applied_recipe
from .footprint import footprint
from .perplexity import perplexity as _perplexity
from .speed import speed as _speed
from .zero_shot import zero_shot as _zero_shot

log = logging.getLogger(__name__)

#: the metric shown for a task in tables (acc_norm where the papers report it)
HEADLINE_METRIC = {"shakespeare_lastword": "acc", "lambada_openai": "acc", "winogrande": "acc",
                   "piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm",
                   "hellaswag": "acc_norm", "shakespeare_nextline": "acc_norm"}


@dataclass
class EvalResult:
    name: str
    model: str = ""
    recipe: list[dict[str, Any]] = field(default_factory=list)
    footprint: dict[str, Any] = field(default_factory=dict)
    perplexity: dict[str, dict[str, Any]] = field(default_factory=dict)  # by corpus
    zero_shot: dict[str, dict[str, float]] = field(default_factory=dict)  # by task
    speed: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalResult:
        data = json.loads(Path(path).read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    # -- Markdown ------------------------------------------------------------------
    def task_score(self, task: str) -> float:
        metrics = self.zero_shot.get(task, {})
        return metrics.get(HEADLINE_METRIC.get(task, "acc"), metrics.get("acc", float("nan")))

    @staticmethod
    def markdown_header(corpora: Sequence[str], tasks: Sequence[str], speed: bool) -> str:
        cols = ["method", "params (M)", "bits/param (compressed)", "bits/param (model)", "size (MiB)"]
        cols += [f"ppl {c}" for c in corpora]
        cols += [f"{t} ({HEADLINE_METRIC.get(t, 'acc')})" for t in tasks]
        if speed:
            cols += ["prefill tok/s (b1)", "decode tok/s (b1)", "decode tok/s (b8)", "p50 ms/token"]
        return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)

    def markdown_row(self, corpora: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
                     speed: bool | None = None) -> str:
        corpora = list(self.perplexity) if corpora is None else corpora
        tasks = list(self.zero_shot) if tasks is None else tasks
        speed = self.speed is not None if speed is None else speed
        fp = self.footprint
        cb = fp.get("compressed_bits_per_param", float("nan"))
        cells = [self.name, f"{fp.get('params', 0) / 1e6:.1f}", "—" if _nan(cb) else f"{cb:.3f}", f"{fp.get('bits_per_param', float('nan')):.3f}",
                 f"{fp.get('bytes', 0) / 2**20:.1f}"]
        cells += [_fmt(self.perplexity.get(c, {}).get("ppl"), 2) for c in corpora]
        cells += [_fmt(self.task_score(t) * 100, 1) for t in tasks]
        if speed:
            s = self.speed or {}
            cells += [_fmt(s.get("prefill_tokens_per_s", {}).get("1"), 0),
                      _fmt(s.get("decode_tokens_per_s", {}).get("1"), 1),
                      _fmt(s.get("decode_tokens_per_s", {}).get("8"), 1),
                      _fmt(s.get("latency_ms_p50"), 1)]
        return "| " + " | ".join(cells) + " |"


def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _fmt(x: Any, digits: int) -> str:
    return "—" if _nan(x) else f"{x:.{digits}f}"


def evaluate(
    model,
    tokenizer,
    *,
    name: str | None = None,
    ppl: Sequence[str] | str | None = ("shakespeare",),
    seq_len: int = 2048,
    max_windows: int | None = None,
    tasks: Sequence[str] | str = (),
    limit: int | float | None = None,
    speed: bool | dict[str, Any] = False,
    model_name: str = "",
    batch_size: int = 4,
) -> EvalResult:
    """Perplexity on each corpus in ``ppl``, zero-shot ``tasks`` (lm-eval), footprint, and (if
    ``speed``, a bool or the keyword arguments of :func:`llmdeploy.eval.speed`) speed."""
    t0 = time.perf_counter()
    recipe = applied_recipe(model)
    name = name or (" + ".join(r["method"] for r in recipe) if recipe else "dense")
    result = EvalResult(name=name, model=model_name, recipe=recipe,
                        footprint=footprint(model, disk=True).to_dict())
    for corpus in [ppl] if isinstance(ppl, str) else (ppl or []):
        r = _perplexity(model, tokenizer, corpus=corpus, seq_len=seq_len, max_windows=max_windows,
                        batch_size=batch_size)
        result.perplexity[str(corpus)] = r.to_dict()
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if tasks:
        result.zero_shot = _zero_shot(model, tokenizer, tasks, limit=limit, batch_size=batch_size)
    if speed:
        kwargs = speed if isinstance(speed, dict) else {}
        result.speed = _speed(model, tokenizer, **kwargs).to_dict()
    from .. import __version__

    result.meta = {
        "llmdeploy": __version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "device": str(next(model.parameters()).device),
        "seconds": time.perf_counter() - t0,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "zero_shot_limit": limit,
    }
    return result
