"""Tree forwards with folded GQA attention against transformers' per-head key/value copies.

    python -m benchmarks.gqa_fold

One verification forward of a 5-node tree on ``smollm2-135m`` (3 query heads per key/value head)
after 100 cached tokens, row kernel on, 2 threads, batch 1 and 4: transformers' SDPA path
(``repeat_kv``) and :func:`llmdeploy.decode.attention.folded_gqa`, interleaved; medians of the
forwards after 3 warm-up pairs. Writes ``results/decode/gqa_fold.json`` and ``GQA_FOLD.md``.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

import llmdeploy
from llmdeploy import decode as D
from llmdeploy.decode.attention import folded_gqa
from llmdeploy.decode.engine import Runner
from llmdeploy.kernels.rows import few_row_linears

RESULTS = Path(__file__).resolve().parent / "results" / "decode"
REPEATS, WARMUP, CONTEXT = 25, 3, 100


def main() -> int:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, _ = llmdeploy.load("smollm2-135m")
    model.eval()
    tree = D.TokenTree([5, 6, 7, 8, 9], [-1, 0, 0, 1, 2])
    rows = {}
    with few_row_linears(model):
        for batch in (1, 4):
            runner = Runner(model, batch, capacity=512)
            runner.forward([D.TokenTree.chain(list(range(100, 100 + CONTEXT)))] * batch)
            runner.cache.commit([range(CONTEXT)] * batch)
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(REPEATS):
                for fold in (False, True):
                    with folded_gqa(model) if fold else contextlib.nullcontext():
                        t0 = time.perf_counter()
                        runner.forward([tree] * batch)
                        times[fold].append(time.perf_counter() - t0)
                    runner.cache.commit([[0]] * batch)  # keep the root: the context grows by one per forward
            a, b = (statistics.median(times[f][WARMUP:]) * 1e3 for f in (False, True))
            rows[str(batch)] = {"repeat_kv_ms": a, "folded_ms": b, "ratio": b / a,
                                "all_repeat_kv_ms": [t * 1e3 for t in times[False]],
                                "all_folded_ms": [t * 1e3 for t in times[True]]}
    res = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "tree": 5, "context": CONTEXT,
           "repeats": REPEATS - WARMUP, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gqa_fold.json").write_text(json.dumps(res, indent=1))
    lines = [f"# Folded GQA attention in a tree forward (`python -m benchmarks.gqa_fold`, {res['date']})", "",
             f"smollm2-135m, 5-node tree after {CONTEXT} cached tokens, row kernel on, {res['threads']} threads; "
             f"medians of {res['repeats']} interleaved forwards.", "",
             "| batch | transformers (repeat_kv) ms | folded ms | ratio |", "|---|---|---|---|"]
    lines += [f"| {b} | {r['repeat_kv_ms']:.2f} | {r['folded_ms']:.2f} | {r['ratio']:.3f} |" for b, r in rows.items()]
    (RESULTS / "GQA_FOLD.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
