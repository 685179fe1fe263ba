"""GPTQ's column walk: the C kernel against the torch loop, per layer shape of SmolLM2-135M.

    python -m benchmarks.gptq_walk

Times ``gptq_quantize`` (4-bit, groups of 64) of random weights given XᵀX of correlated inputs,
whole (factorisation included) — once with the C column walk, once with
``llmdeploy.kernels.use_reference()`` (the torch loop), interleaved, ``--repeats`` times; medians.
Each round also checks that both paths return the same codes, scales and zero points bitwise.
Writes ``results/gptq/walk.json`` and ``WALK.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from llmdeploy.kernels import use_reference
from llmdeploy.quant import gptq_quantize

RESULTS = Path(__file__).resolve().parent / "results" / "gptq"
SHAPES = {"q/o_proj 576x576": (576, 576), "k/v_proj 192x576": (192, 576), "gate/up_proj 1536x576": (1536, 576),
          "down_proj 576x1536": (576, 1536)}


def run(repeats: int) -> dict:
    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        w = torch.randn(out_f, in_f, generator=g) * 0.05
        x = torch.randn(4096, in_f, generator=g) @ (torch.randn(in_f, in_f, generator=g) / in_f**0.5 + torch.eye(in_f))
        xtx = x.T @ x
        times: dict[str, list[float]] = {"c": [], "torch": []}
        equal = True
        for r in range(repeats + 1):  # the first round warms up and is not counted
            outs = {}
            for path in (("c", "torch") if r % 2 == 0 else ("torch", "c")):
                t0 = time.perf_counter()
                if path == "c":
                    outs[path] = gptq_quantize(w, xtx, 4, 64)
                else:
                    with use_reference():
                        outs[path] = gptq_quantize(w, xtx, 4, 64)
                if r:
                    times[path].append(time.perf_counter() - t0)
            equal &= all(torch.equal(a, b) for a, b in zip(outs["c"], outs["torch"]))
        rows.append({"layer": name, "c_ms": [t * 1e3 for t in times["c"]], "torch_ms": [t * 1e3 for t in times["torch"]],
                     "c_median_ms": statistics.median(times["c"]) * 1e3,
                     "torch_median_ms": statistics.median(times["torch"]) * 1e3, "bitwise_equal": equal})
        print(rows[-1]["layer"], f"{rows[-1]['c_median_ms']:.1f} ms vs {rows[-1]['torch_median_ms']:.1f} ms", flush=True)
    return {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "repeats": repeats, "rows": rows}


def markdown(res: dict) -> str:
    lines = [f"# GPTQ column walk: C against the torch loop (`python -m benchmarks.gptq_walk`, {res['date']})", "",
             f"`gptq_quantize` of one layer (4-bit, groups of 64, factorisation included), {res['threads']} CPU "
             f"threads, medians of {res['repeats']} interleaved rounds after a warm-up.", "",
             "| layer | C walk (ms) | torch loop (ms) | speed-up | bitwise equal |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['layer']} | {r['c_median_ms']:.1f} | {r['torch_median_ms']:.1f} | "
                     f"{r['torch_median_ms'] / r['c_median_ms']:.2f}x | {'yes' if r['bitwise_equal'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    res = run(args.repeats)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "walk.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "WALK.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
