"""Run the scoreboard: every registered method on the embedded model with a fixed protocol.

    python -m benchmarks.run --suite quick     # ~14 minutes on 2 cores (13.7 measured)
    python -m benchmarks.run --suite full      # an hour or two
    python -m benchmarks.run --suite quick --only rtn-w4-g64   # re-run one row

Protocol (both suites): model ``smollm2-135m``; calibration windows: 128 x 512 tokens from the
shakespeare train split, seed 0 (passed to every method that calibrates); perplexity with
seq_len 512 on the shakespeare test split; the offline zero-shot tasks (shakespeare_nextline,
shakespeare_lastword) through lm-eval; speed (prefill 128 tokens, 16/32 decode steps, batch 1
and 8). The suites differ only in how much they evaluate (see SUITES). Writes
``benchmarks/results/<suite>/<method>.json``, ``RESULTS.md`` and the plots.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import torch

import llmdeploy
from llmdeploy.data import calibration
from llmdeploy.eval import OFFLINE_TASKS, evaluate
from llmdeploy.report import build_report

from .methods import for_suite

log = logging.getLogger("benchmarks")

MODEL = "smollm2-135m"
CALIB = {"corpus": "shakespeare", "n_samples": 128, "seq_len": 512, "seed": 0}
SEQ_LEN = 512
SUITES = {
    "quick": {"max_windows": 8, "limit": 16, "speed": {"prompt_len": 64, "new_tokens": 4, "repeats": 2}},
    "full": {"max_windows": 128, "limit": None, "speed": {"prompt_len": 128, "new_tokens": 32, "repeats": 5}},
}
RESULTS = Path(__file__).resolve().parent / "results"


def preamble(suite: str) -> str:
    s = SUITES[suite]
    return (
        f"Model `{MODEL}` (SmolLM2-135M-Instruct; its GGUF stores the decoder linears as Q4_1, groups "
        f"of 32, so the dense fp32 weights already lie on a 4-bit grid). Perplexity: shakespeare test "
        f"split, seq_len {SEQ_LEN}, first {s['max_windows']} windows. Zero-shot: offline tasks, "
        f"{s['limit'] or 'all 300'} items each, lm-eval, 0-shot; accuracies in %"
        + (f" (with {s['limit']} items one standard error is about 12 points: use the full suite "
           "to compare accuracies)" if s["limit"] else "")
        + ". Calibration: "
        f"{CALIB['n_samples']} x {CALIB['seq_len']} tokens of the shakespeare train split, seed "
        f"{CALIB['seed']}. Speed: fp32 on CPU, {torch.get_num_threads()} threads, prefill of "
        f"{s['speed']['prompt_len']} tokens, {s['speed']['new_tokens']} greedy decode steps, medians of "
        f"{s['speed']['repeats']} runs; compare rows of one run only (this machine is noisy; when rows come "
        "from runs of different days, the `measured` column gives each row's, and rows measured before "
        "2026-11-29 predate the C kernels of compressed layers). "
        "Bits per parameter count codes, scales, zero points and every dense tensor (the tied fp32 "
        "embedding is 28 M of the 135 M parameters). `python -m benchmarks.run --suite "
        f"{suite}` regenerates this file."
    )


def write_report(suite: str, out: Path) -> Path:
    return build_report(out, title=f"Scoreboard — {suite} suite", preamble=preamble(suite))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="quick")
    p.add_argument("--only", action="append", help="run only these methods (repeatable)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<suite>)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    suite = SUITES[args.suite]
    out = Path(args.out) if args.out else RESULTS / args.suite
    out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in for_suite(args.suite) if not args.only or m.name in args.only]
    t0 = time.perf_counter()
    dense, tok = llmdeploy.load(MODEL)
    calib = None
    state: dict = {}
    bases = {m.base for m in methods if m.base}
    results_time: dict[str, float] = {}
    kept: dict[str, torch.nn.Module] = {}  # compressed models later methods start from
    for method in methods:
        log.info("=== %s", method.name)
        if method.base and method.base not in kept:
            raise SystemExit(f"{method.name} starts from {method.base}: run both in one invocation "
                             f"(--only {method.base} --only {method.name})")
        t1 = time.perf_counter()
        compressor = method.build(state)
        model = dense
        if compressor is not None:
            if compressor.needs_calibration and calib is None:
                calib = calibration(tok, **CALIB)
            used = calib if calib is None or method.calib_samples is None else calib[: method.calib_samples]
            if method.base:  # dense -> base -> this method is one recipe: it started from the dense model
                compressor.before_recipe(dense, used)
            model = compressor(copy.deepcopy(kept[method.base] if method.base else dense), used)
            state[method.name] = compressor
        if method.name in bases:
            kept[method.name] = model
        compress_s = time.perf_counter() - t1
        result = evaluate(model, tok, name=method.name, model_name=MODEL, ppl=["shakespeare"],
                          seq_len=SEQ_LEN, max_windows=suite["max_windows"], tasks=list(OFFLINE_TASKS),
                          limit=suite["limit"], speed=suite["speed"])
        calib_meta = dict(CALIB, n_samples=method.calib_samples or CALIB["n_samples"])
        if method.base:
            result.meta["base"] = method.base
            compress_s += results_time.get(method.base, 0.0)
        results_time[method.name] = compress_s
        result.meta.update(suite=args.suite, compress_seconds=compress_s, note=method.note,
                           calibration=calib_meta, layers=model.config.num_hidden_layers)
        report = compressor.report_ if compressor is not None else None
        if report is not None:  # what the method found while running (its typed report)
            result.meta["report"] = {"type": type(report).__name__, **report.to_dict()}
            if report.summary():
                result.meta["note"] += "; " + report.summary()
        result.save(out / f"{method.name}.json")
        log.info("%s: %s", method.name, result.markdown_row())
        del model
    md = write_report(args.suite, out)
    log.info("done in %.0fs: %s", time.perf_counter() - t0, md)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
