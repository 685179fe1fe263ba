import json

import yaml

from llmdeploy.data import shakespeare_split, work_key
from llmdeploy.eval.tasks import build_lastword, build_nextline, task_dir


def test_nextline_is_deterministic_and_sound():
    a = build_nextline(120, seed=0)
    assert a == build_nextline(120, seed=0)
    assert a != build_nextline(120, seed=1)
    test_files = set(shakespeare_split()["test"])
    labels = [it["label"] for it in a]
    assert len(a) == 120 and len({it["context"] for it in a}) == 120
    assert all(labels.count(k) > 15 for k in range(4))  # the answer's slot is not predictable
    for it in a:
        assert it["play"] in test_files
        choices, answer = it["choices"], it["choices"][it["label"]]
        assert len(choices) == 4 and len(set(choices)) == 4  # distractors differ from the answer
        context_lines = it["context"].split("\n")
        assert answer not in context_lines  # no leak of the answer into the passage
        assert not any(c in context_lines for c in choices)


def test_nextline_distractors_come_from_other_works():
    from llmdeploy.eval import tasks as T

    plays = T._play_lines()
    by_line = {}
    for name, lines in plays.items():
        for ln in lines:
            by_line.setdefault(ln, set()).add(work_key(name))
    for it in build_nextline(60, seed=3):
        own = work_key(it["play"])
        for k, c in enumerate(it["choices"]):
            if k != it["label"]:
                assert by_line[c] - {own}, c


def test_lastword_is_deterministic_and_sound():
    a = build_lastword(120, seed=0)
    assert a == build_lastword(120, seed=0) and a != build_lastword(120, seed=2)
    for it in a:
        word = it["target"]
        assert word.startswith(" ") and word[1:].isalpha() and len(word) >= 5
        assert not it["context"].endswith(word[1:])  # the word itself is not in the prompt's tail
        assert not it["context"].endswith(" ")
        assert word[1:].lower() in it["context"].lower()  # guessable from the passage (LAMBADA-style)


def test_task_dir_writes_lm_eval_configs(tmp_path):
    folder = task_dir(n_items=20, seed=0, root=tmp_path / "tasks")
    for name in ("shakespeare_nextline", "shakespeare_lastword"):
        cfg = yaml.safe_load((folder / f"{name}.yaml").read_text())
        assert cfg["task"] == name and cfg["dataset_path"] == "json"
        data = cfg["dataset_kwargs"]["data_files"]["test"]
        rows = [json.loads(line) for line in open(data)]
        assert len(rows) == 20
    assert (folder / ".complete").exists()
