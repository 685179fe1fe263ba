import json
import subprocess
import sys

import pytest
import torch

import llmdeploy
from llmdeploy.eval import zero_shot
from llmdeploy.eval.tasks import task_dir
from llmdeploy.quant import RTN

TASKS = ["shakespeare_nextline", "shakespeare_lastword"]
LIMIT = 6


@pytest.mark.slow
def test_in_memory_path_equals_lm_eval_command_line(tmp_path):
    model, tok = llmdeploy.load("tiny-llama")
    ours = zero_shot(model, tok, TASKS, limit=LIMIT, batch_size=4)
    saved = llmdeploy.save(model, tok, tmp_path / "model")
    out = tmp_path / "lm_eval_out"
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
           "--model_args", f"pretrained={saved},dtype=float32", "--tasks", ",".join(TASKS),
           "--include_path", str(task_dir()), "--limit", str(LIMIT), "--batch_size", "4",
           "--device", "cpu", "--num_fewshot", "0", "--output_path", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(out.rglob("results_*.json"))
    assert files, proc.stdout[-2000:]
    theirs = json.loads(files[-1].read_text())["results"]
    for task in TASKS:
        for metric, value in ours[task].items():
            if metric.endswith("_stderr"):
                continue
            assert value == pytest.approx(theirs[task][f"{metric},none"], rel=1e-6), (task, metric)


@pytest.mark.parametrize("family", ["tiny-qwen2", "tiny-opt"])
def test_compressed_models_run_under_lm_eval(family):
    model, tok = llmdeploy.load(family)  # tiny-qwen2 ties its embeddings
    dense = zero_shot(model, tok, ["shakespeare_lastword"], limit=4)
    RTN(bits=8, group_size=-1)(model)
    comp = zero_shot(model, tok, ["shakespeare_lastword"], limit=4)
    assert model.device == torch.device("cpu")
    assert set(comp["shakespeare_lastword"]) >= {"acc", "perplexity"}
    # 8-bit per-channel barely moves the log-likelihoods.
    assert comp["shakespeare_lastword"]["perplexity"] == pytest.approx(
        dense["shakespeare_lastword"]["perplexity"], rel=0.2)
