"""ONNX Runtime against torch on this machine's CPU, in one run (issue #19).

    python -m benchmarks.onnx_speed [--repeats 7]

``smollm2-135m`` dense (fp32) and RTN 4-bit (group 32; torch runs the library's packed layers,
ONNX Runtime its ``MatMulNBits`` operator) are exported with ``llmdeploy.io.export_onnx`` and
timed on the same inputs: one forward over the whole sequence (the exported graph has no KV cache:
scoring, prefill), batch 1 at 32, 128 and 512 tokens and batch 4 at 128. Both use the same number
of threads (torch's; ``intra_op_num_threads`` for ONNX Runtime). Every (model, shape, runtime)
is timed once per round, rounds interleaved, after a warm-up; the table reports medians and the
ratio of ONNX Runtime's speed to torch's, with the largest logit difference between the two.
Writes ``results/onnx/onnx.json``, ``ONNX.md`` and ``onnx.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import llmdeploy
from llmdeploy.io import export_onnx
from llmdeploy.quant import RTN

RESULTS = Path(__file__).resolve().parent / "results" / "onnx"
SHAPES = ((1, 32), (1, 128), (1, 512), (4, 128))


def run(repeats: int) -> dict:
    import onnxruntime as ort

    threads = torch.get_num_threads()
    dense, tok = llmdeploy.load("smollm2-135m")
    dense.eval()
    models = {"dense fp32": dense, "RTN 4-bit g32": RTN(bits=4, group_size=32)(llmdeploy.load("smollm2-135m")[0], None)}
    g = torch.Generator().manual_seed(0)
    inputs = {s: torch.randint(0, dense.config.vocab_size, s, generator=g) for s in SHAPES}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for name, model in models.items():
            model.eval()
            out = Path(tmp) / name.replace(" ", "_")
            report = export_onnx(model, tok, out)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            sess = ort.InferenceSession(str(out / "model.onnx"), opts, providers=["CPUExecutionProvider"])
            runners[name] = (model, sess, len(report.matmul_nbits))
        times = {(n, s, rt): [] for n in runners for s in SHAPES for rt in ("torch", "onnxruntime")}
        diffs = {}
        for r in range(repeats + 1):  # round 0 warms up
            for name, (model, sess, _) in runners.items():
                for s, ids in inputs.items():
                    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones(s, dtype=np.int64)}
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        model(input_ids=ids)
                    t1 = time.perf_counter()
                    sess.run(None, feed)
                    t_torch, t_ort = t1 - t0, time.perf_counter() - t1
                    if r == 0:
                        with torch.no_grad():
                            ref = model(input_ids=ids).logits.numpy()
                        diffs[(name, s)] = float(np.abs(sess.run(None, feed)[0] - ref).max())
                        continue
                    times[(name, s, "torch")].append(t_torch)
                    times[(name, s, "onnxruntime")].append(t_ort)
        for name, (_, _, nbits) in runners.items():
            for s in SHAPES:
                tt = statistics.median(times[(name, s, "torch")])
                to = statistics.median(times[(name, s, "onnxruntime")])
                rows[f"{name} | {s[0]}x{s[1]}"] = {
                    "model": name, "batch": s[0], "tokens": s[1], "torch_ms": tt * 1e3, "onnxruntime_ms": to * 1e3,
                    "ort_speed_vs_torch": tt / to, "max_abs_logit_diff": diffs[(name, s)], "matmul_nbits_layers": nbits,
                    "torch_runs_ms": [x * 1e3 for x in times[(name, s, "torch")]],
                    "onnxruntime_runs_ms": [x * 1e3 for x in times[(name, s, "onnxruntime")]]}
    import onnxruntime

    return {"date": time.strftime("%Y-%m-%d"), "threads": threads, "repeats": repeats, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "rows": rows}


def markdown(res: dict) -> str:
    lines = [f"# ONNX Runtime vs torch on CPU (`python -m benchmarks.onnx_speed`, {res['date']})", "",
             f"`smollm2-135m`, one forward over the whole sequence, {res['threads']} threads each; medians of "
             f"{res['repeats']} interleaved rounds after a warm-up (torch {res['torch']}, onnxruntime "
             f"{res['onnxruntime']}).", "",
             "| model | batch × tokens | torch (ms) | onnxruntime (ms) | onnxruntime speed / torch | max logit diff |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"].values():
        lines.append(f"| {r['model']} | {r['batch']}×{r['tokens']} | {r['torch_ms']:.1f} | {r['onnxruntime_ms']:.1f} | "
                     f"{r['ort_speed_vs_torch']:.2f}× | {r['max_abs_logit_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(res["rows"].values())
    labels = [f"{r['model']}\n{r['batch']}×{r['tokens']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 4))
    ax.bar(x - 0.2, [r["torch_ms"] for r in rows], 0.4, label="torch")
    ax.bar(x + 0.2, [r["onnxruntime_ms"] for r in rows], 0.4, label="onnxruntime")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("ms per forward (median)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    res = run(args.repeats)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "onnx.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "ONNX.md").write_text(markdown(res))
    plot(res, RESULTS / "onnx.png")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
