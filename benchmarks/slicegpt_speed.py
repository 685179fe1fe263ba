"""Prefill and decode throughput of SliceGPT-sliced SmolLM2-135M against the dense model, one run.

    python -m benchmarks.slicegpt_speed

Slices the dense model at 10/20/25/30% (PCA on 8 calibration windows: speed depends on the
shapes, not on the rotation), then measures every model in interleaved rounds (so the machine's
drift hits all alike) with ``llmdeploy.eval.speed``: prefill of 128 tokens, 16 greedy decode
steps, batch 1 and 8, fp32 on CPU. Reports medians over rounds and ratios to dense. Writes
``benchmarks/results/slicegpt/speed.json`` and ``speed.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
from pathlib import Path

import torch

import llmdeploy
from llmdeploy.data import calibration
from llmdeploy.eval import speed
from llmdeploy.prune import SliceGPT

RESULTS = Path(__file__).resolve().parent / "results" / "slicegpt"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.25, 0.3])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dense, tok = llmdeploy.load("smollm2-135m")
    calib = calibration(tok, "shakespeare", n_samples=8, seq_len=512, seed=0)
    models = {"dense": dense}
    params = {"dense": sum(p.numel() for p in dense.parameters())}
    for s in args.sparsities:
        sg = SliceGPT(sparsity=s)
        m = sg(copy.deepcopy(dense), calib)
        models[f"slicegpt-{round(s * 100)}"] = m
        params[f"slicegpt-{round(s * 100)}"] = sg.report_.params_sliced
    runs: dict[str, list] = {k: [] for k in models}
    for r in range(args.rounds):
        for name, m in models.items():
            runs[name].append(speed(m, tok, prompt_len=128, new_tokens=16, batch_sizes=(1, 8), warmup=1,
                                    repeats=1, seed=r))
            logging.info("round %d %s: %s", r, name, runs[name][-1].decode_tokens_per_s)
    rows = []
    for name, rs in runs.items():
        row = {"model": name, "params": params[name],
               "prefill_b1": statistics.median(x.prefill_tokens_per_s[1] for x in rs),
               "prefill_b8": statistics.median(x.prefill_tokens_per_s[8] for x in rs),
               "decode_b1": statistics.median(x.decode_tokens_per_s[1] for x in rs),
               "decode_b8": statistics.median(x.decode_tokens_per_s[8] for x in rs)}
        rows.append(row)
    base = rows[0]
    for row in rows:
        for k in ("prefill_b1", "prefill_b8", "decode_b1", "decode_b8"):
            row[k + "_vs_dense"] = row[k] / base[k]
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"threads": torch.get_num_threads(), "rounds": args.rounds, "prompt_len": 128, "new_tokens": 16,
            "dtype": "float32", "device": "cpu"}
    (RESULTS / "speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# SliceGPT speed on CPU ({meta['threads']} threads, fp32, medians of {args.rounds} interleaved "
             "rounds; ratios to dense in the same run)", "",
             "| model | params (M) | prefill tok/s b1 | prefill b8 | decode tok/s b1 | decode b8 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f} | {r['prefill_b1']:.0f} ({r['prefill_b1_vs_dense']:.2f}x) "
                     f"| {r['prefill_b8']:.0f} ({r['prefill_b8_vs_dense']:.2f}x) | {r['decode_b1']:.1f} "
                     f"({r['decode_b1_vs_dense']:.2f}x) | {r['decode_b8']:.1f} ({r['decode_b8_vs_dense']:.2f}x) |")
    (RESULTS / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
