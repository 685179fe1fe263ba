"""Zero-shot accuracy through lm-evaluation-harness, on the in-memory (possibly compressed) model.

The model is wrapped in lm-eval's ``HFLM``, so any lm-eval task works when its data is reachable
(piqa, arc_easy, arc_challenge, hellaswag, winogrande, lambada_openai...), and the offline
Shakespeare tasks of :mod:`llmdeploy.eval.tasks` are always available.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from .tasks import task_dir

log = logging.getLogger(__name__)

#: the zero-shot set of the compression papers (needs the hub for its data)
PAPER_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai")
#: offline tasks shipped with llmdeploy
OFFLINE_TASKS = ("shakespeare_nextline", "shakespeare_lastword")


def wrap_for_lm_eval(model, tokenizer, batch_size: int = 8, max_length: int | None = None):
    """An lm-eval ``HFLM`` around an in-memory model (dense or compressed)."""
    from lm_eval.models.huggingface import HFLM

    device = next(model.parameters()).device
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device),
                max_length=max_length)


def clean_results(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{"acc,none": 0.5, "alias": ...}`` -> ``{"acc": 0.5}`` for each task."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        clean = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            if filt == "none":
                clean[metric] = float(value)
        out[task] = clean
    return out


def zero_shot(
    model,
    tokenizer,
    tasks: Sequence[str] = OFFLINE_TASKS,
    limit: int | float | None = None,
    *,
    batch_size: int = 8,
    n_items: int = 300,
    seed: int = 0,
    max_length: int | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval ``tasks`` zero-shot on ``model``; returns ``{task: {metric: value}}``.

    Multiple-choice tasks report ``acc`` and ``acc_norm`` (length-normalised), as the papers do;
    each metric's standard error comes as ``<metric>_stderr``. ``limit`` caps the items per task.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    t0 = time.perf_counter()
    lm = wrap_for_lm_eval(model, tokenizer, batch_size=batch_size, max_length=max_length)
    # Indexing lm-eval's thousands of built-in task files takes seconds: skip it when only the
    # offline tasks are asked for.
    only_offline = all(t in OFFLINE_TASKS for t in tasks)
    manager = TaskManager(include_path=str(task_dir(n_items=n_items, seed=seed)),
                          include_defaults=not only_offline)
    was_training = model.training
    model.eval()
    out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, limit=limit,
                          task_manager=manager, log_samples=False, bootstrap_iters=1000,
                          verbosity="WARNING")
    model.train(was_training)
    results = clean_results(out["results"])
    log.info("zero-shot %s in %.1fs: %s", list(tasks), time.perf_counter() - t0, results)
    return results
