"""GPTQ against RTN on SmolLM2-135M at the perplexity protocol (128 windows of 512 tokens).

    python -m benchmarks.gptq                      # dense, RTN and GPTQ at 4/3/2 bits, groups of 64
    python -m benchmarks.gptq --bits 4 3 --variants gptq gptq-act gptq-act-mse

Calibration: ``--calib`` windows of 512 tokens of the shakespeare train split (seed 0, the
scoreboard's); evaluation: the shakespeare test split. Variants: ``rtn``/``gptq`` with the
defaults, ``-act`` with ``act_order=True`` (static groups), ``-mse`` with the clipping search of
the grid (``mse=True``). Rows already in ``gptq.json`` are kept.
Writes ``results/gptq/gptq.json`` and ``GPTQ.md`` (perplexity, ratio to dense, quantization time).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

import llmdeploy
from llmdeploy.data import calibration
from llmdeploy.eval import perplexity
from llmdeploy.quant import GPTQ, RTN

RESULTS = Path(__file__).resolve().parent / "results" / "gptq"
MODEL, GROUP = "smollm2-135m", 64
VARIANTS = {  # name: (method, options); a row is named f"{method}-w{bits}-g64{suffix}"
    "rtn": (RTN, {}),
    "rtn-mse": (RTN, {"mse": True}),
    "gptq": (GPTQ, {}),
    "gptq-act": (GPTQ, {"act_order": True}),
    "gptq-mse": (GPTQ, {"mse": True}),
    "gptq-act-mse": (GPTQ, {"act_order": True, "mse": True}),
}
log = logging.getLogger("benchmarks.gptq")


CALIB = 32  # the scoreboard's calibration windows; other sizes get their own rows


def row_name(variant: str, bits: int, calib: int = CALIB) -> str:
    """``gptq-act`` at 4 bits -> ``gptq-w4-g64-act`` (``…-cal128`` when calibrated on 128 windows)."""
    method, _, suffix = variant.partition("-")
    name = f"{method}-w{bits}-g{GROUP}" + (f"-{suffix}" if suffix else "")
    return name + (f"-cal{calib}" if calib != CALIB and VARIANTS[variant][0].needs_calibration else "")


def markdown(res: dict) -> str:
    m = res["meta"]
    dense = res["rows"]["dense"]["ppl"]
    lines = [f"# GPTQ vs RTN on `{MODEL}` (`python -m benchmarks.gptq`, {m['date']})", "",
             f"Perplexity on the shakespeare test split, seq_len 512, {m['windows']} windows; GPTQ calibrated on "
             f"the column's windows of 512 tokens (shakespeare train, seed 0; {CALIB} unless the row's name ends "
             f"in `-calN`); groups of {GROUP}, asymmetric; {m['threads']} CPU threads.", "",
             "| model | options | calibration windows | ppl | x dense | quantize s |", "|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        s = f"{r['seconds']:.0f}" if r.get("seconds") else ""
        opts = ", ".join(f"{k}={v}" for k, v in r.get("options", {}).items())
        cal = r.get("calib", CALIB if name.startswith("gptq") else "")
        lines.append(f"| {name} | {opts} | {cal} | {r['ppl']:.3f} | {r['ppl'] / dense:.3f} | {s} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--variants", nargs="+", default=["rtn", "gptq"], choices=sorted(VARIANTS))
    p.add_argument("--calib", type=int, default=CALIB)
    p.add_argument("--windows", type=int, default=128)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "gptq.json"
    res = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    res["meta"] = {"date": time.strftime("%Y-%m-%d"), "windows": args.windows, "threads": torch.get_num_threads()}
    todo = [("dense", None)] + [(row_name(v, b, args.calib), (v, b)) for b in args.bits for v in args.variants]
    for name, spec in todo:
        if name in res["rows"]:
            continue
        model, tok = llmdeploy.load(MODEL)
        model.eval()
        seconds, options, n_calib = None, {}, None
        if spec is not None:
            variant, bits = spec
            method, options = VARIANTS[variant]
            n_calib = args.calib if method.needs_calibration else None
            calib = calibration(tok, "shakespeare", n_samples=args.calib, seq_len=512, seed=0) if n_calib else None
            t0 = time.perf_counter()
            model = method(bits=bits, group_size=GROUP, **options)(model, calib)
            seconds = time.perf_counter() - t0
        ppl = perplexity(model, tok, "shakespeare", seq_len=512, max_windows=args.windows).ppl
        res["rows"][name] = {"ppl": ppl, "seconds": seconds, "options": options}
        if n_calib:
            res["rows"][name]["calib"] = n_calib
        log.info("%s: ppl %.3f (%s s)", name, ppl, seconds)
        path.write_text(json.dumps(res, indent=2))
    (RESULTS / "GPTQ.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
