"""PV-Tuning against its baselines at equal steps and data (issue #13).

    python -m benchmarks.pv_tuning --base gptq-w2          # calibration alone, P-only, STE, PV
    python -m benchmarks.pv_tuning --base aqlm-2x8 gptq-w3 --steps 20 --batch 4
    python -m benchmarks.pv_tuning --base aqlm-2x8 --modes pv --steps 60 --beam 1   # a longer run: its own row

For each base quantization (built as the scoreboard builds it, cached under
``~/.cache/llmdeploy/bench``): perplexity of the quantized model alone, then one run per mode of
:class:`llmdeploy.quant.PVTuning` from that same model — same steps, same windows (the protocol's
128 x 512 calibration windows, shakespeare train, seed 0, in the same seeded order), the dense
model as teacher (KL on the fly) — each followed by perplexity on the shakespeare test split
(seq_len 512, ``--windows`` windows). Held-out perplexity is tracked during training on the
first ``--eval-windows`` test windows. The table's rows share ``--steps`` (20: the modes compared
at equal steps); a run with other steps writes rows named ``base+mode@Nsteps``. Every row records the
base's build (a hash of its weights): a rebuilt base — AQLM is not bitwise reproducible — is
evaluated as its own row ``base (build …)``, and a mode already measured from another build
gets a row ``base+mode (build …)``. ``--trust-ratio R`` (default 0.01, the published recipe's and
the library's default) bounds each step's change of every quantized weight to R times its norm
(``code_trust_ratio``); its rows are named ``base+mode/trustR``, and ``--trust-ratio 0`` runs
unbounded (rows without the suffix: every row measured before the option existed).
``--max-code-change F [F ...]`` runs PV once per fraction F of code groups it may re-encode per step
(default 0.01, the library's default; other values name their rows ``base+pv/mccF…``): the subspace
restriction only distinguishes PV from STE when it binds, i.e. below the fraction the trust ratio
already lets change. ``--code-lr F [F ...]`` runs STE and PV once per V-step learning rate (default
1e-2, the library's; other values name their rows ``base+mode/lrF…``): the classic unbounded
straight-through baseline (``--trust-ratio 0``) diverges at 1e-2, so it is compared at its own
tuned rate. Rows already in
``pv_tuning.json`` are kept (delete it to re-run). Writes ``results/pv_tuning/pv_tuning.json``,
``PV_TUNING.md`` and ``pv_tuning.png``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import time
from pathlib import Path

import torch

import llmdeploy
from llmdeploy.data import calibration
from llmdeploy.eval import perplexity
from llmdeploy.eval.perplexity import test_windows
from llmdeploy.quant import AQLM, GPTQ, PVTuning

RESULTS = Path(__file__).resolve().parent / "results" / "pv_tuning"
CACHE = Path.home() / ".cache" / "llmdeploy" / "bench"
MODEL = "smollm2-135m"
MODES = ("p_only", "ste", "pv")
STEPS = 20  # the table's comparison of modes at equal steps
MAX_CODE_CHANGE = 0.01  # PVTuning's default
CODE_LR = 1e-2  # PVTuning's default
BASES = {  # as benchmarks/methods.py registers them (32 calibration windows)
    "gptq-w2": lambda: GPTQ(bits=2, group_size=64),
    "gptq-w3": lambda: GPTQ(bits=3, group_size=64),
    "aqlm-2x8": lambda: AQLM(num_codebooks=2, nbits_per_codebook=8, in_group_size=8, batch_size=2,
                             finetune_batch_size=2, max_iter=6, steps_per_round=20),
}
log = logging.getLogger("benchmarks.pv_tuning")


def quantized(base: str, tok) -> tuple[torch.nn.Module, float, str]:
    """The base model (from the cache when there), the seconds it took to make, and its build: a
    hash of its weights (a rebuilt AQLM base differs; every row records the build it started from)."""
    path = CACHE / f"{MODEL}-{base}"
    if not (path / "bench.json").exists():
        model, _ = llmdeploy.load(MODEL)
        calib = calibration(tok, "shakespeare", n_samples=32, seq_len=512, seed=0)
        t0 = time.perf_counter()
        model = BASES[base]()(model, calib)
        seconds = time.perf_counter() - t0
        llmdeploy.save(model, tok, path)
        (path / "bench.json").write_text(json.dumps({"seconds": seconds}))
    meta = json.loads((path / "bench.json").read_text())
    if "build" not in meta:
        meta["build"] = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()[:10]
        (path / "bench.json").write_text(json.dumps(meta))
    model, _ = llmdeploy.load(path)
    return model.eval(), meta["seconds"], meta["build"]


def markdown(res: dict) -> str:
    m = res["meta"]
    dense = res["dense"]
    lines = [f"# PV-Tuning on `{MODEL}` (`python -m benchmarks.pv_tuning`, {m['date']})", "",
             f"Perplexity on the shakespeare test split, seq_len 512, {m['windows']} windows (dense: {dense:.3f}). "
             f"Every fine-tuning row: {m['steps']} steps of {m['batch']} windows of 512 tokens from the protocol's "
             "calibration windows (same seeded order for every mode), KL to the dense model computed on the fly, "
             "P step Adam lr 3e-4 (β 0.9/0.95) on codebooks/scales and every non-quantized parameter, V step Adam "
             "lr 1e-2 (β 0/0.95) on straight-through buffers; PV re-encodes at most 1% of code groups per step, "
             f"STE all of them (AQLM: beam search of the width in the row), P-only none. {m['threads']} CPU threads; "
             "seconds are wall time of the fine-tuning alone (the base quantization's are in its row).", "",
             "| model | ppl | x dense | base build | held-out ppl during training (step: ppl) | seconds |",
             "|---|---|---|---|---|---|"]
    if any("/trust" in name for name in res["rows"]):
        lines[2] += (" Rows `…/trustR` keep, per weight and step, only the code changes (farthest group first) whose "
                     "norm stays within R times the weight's norm (`code_trust_ratio`, the published recipe's 1e-2); "
                     "rows without it ran unbounded.")
    if any("/mcc" in name for name in res["rows"]):
        lines[2] += (" Rows `…/mccF` ran PV with `max_code_change` F instead of 1e-2: at most that fraction of code "
                     "groups re-encoded per step (the subspace restriction binding below what the trust ratio lets change).")
    if any("/lr" in name for name in res["rows"]):
        lines[2] += (" Rows `…/lrF` ran the V step's Adam at learning rate F instead of 1e-2 (the straight-through "
                     "baseline tuned at its own rate).")
    if any("@" in name for name in res["rows"]):
        lines[2] += " Rows `base+mode@Nsteps` train for N steps (same windows, continuing the seeded order)."
    lines[2] += (" Base build: a hash of the base model's weights (\"first\": the first build, not recorded). The "
                 "base is cached under ~/.cache per machine; AQLM is not bitwise reproducible, so a rebuilt base "
                 "gets its own row `base (build …)` (its modes: `base+mode (build …)`) and every fine-tuning row names "
                 "the build it started from "
                 "(held-out perplexity at step 0 differs between builds): compare modes on one build.")
    for name, r in res["rows"].items():
        curve = ", ".join(f"{s}: {p:.1f}" for s, p in zip(r.get("eval_steps", []), r.get("eval_ppl", [])))
        beam = f" (beam {r['beam']})" if r.get("beam") else ""
        build = r.get("base_build") or "first"
        lines.append(f"| {name}{beam} | {r['ppl']:.3f} | {r['ppl'] / dense:.3f} | {build} | {curve} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = sorted({name.split("+")[0] for name in res["rows"] if "+" in name})
    if not bases:
        return
    fig, axes = plt.subplots(2, len(bases), figsize=(5 * len(bases), 7), squeeze=False)
    for j, base in enumerate(bases):
        runs = [(name, r) for name, r in res["rows"].items() if name.startswith(f"{base}+")]
        for i, (name, r) in enumerate(runs):
            label, color = name.split("+", 1)[1], plt.cm.tab20(i % 20)  # more runs than the default 10 colours
            axes[0][j].plot(range(1, len(r["history"]) + 1), r["history"], label=label, color=color)
            axes[1][j].plot(r["eval_steps"], r["eval_ppl"], marker="o", label=label, color=color)
        axes[0][j].set(title=base, xlabel="step", ylabel="training loss (KL to dense)")
        axes[1][j].set(xlabel="step", ylabel="held-out perplexity (log)", yscale="log")  # diverged runs reach 1e3-1e5
        axes[1][j].axhline(res["dense"], color="gray", ls="--", label="dense")
        axes[0][j].legend()
        axes[1][j].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", nargs="+", default=["gptq-w2"], choices=sorted(BASES))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--trust-ratio", type=float, default=0.01,
                   help="code_trust_ratio of the runs that change codes (0: unbounded)")
    p.add_argument("--max-code-change", type=float, nargs="+", default=[MAX_CODE_CHANGE],
                   help="PV's max_code_change; one PV run per value")
    p.add_argument("--code-lr", type=float, nargs="+", default=[CODE_LR],
                   help="the V step's learning rate of STE and PV runs; one run per value")
    p.add_argument("--windows", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=5)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "pv_tuning.json"
    res = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    res["meta"] = {"date": time.strftime("%Y-%m-%d"), "windows": args.windows, "steps": STEPS,
                   "batch": args.batch, "threads": torch.get_num_threads()}
    dense, tok = llmdeploy.load(MODEL)
    dense.eval()
    if "dense" not in res:
        res["dense"] = perplexity(dense, tok, "shakespeare", seq_len=512, max_windows=args.windows).ppl
    calib = calibration(tok, "shakespeare", n_samples=128, seq_len=512, seed=0)
    held_out = test_windows(tok, "shakespeare", 512, args.eval_windows)

    def save() -> None:
        path.write_text(json.dumps(res, indent=2))

    for base in args.base:
        model, seconds, build = quantized(base, tok)
        known = [n for n in res["rows"] if n.split(" ")[0] == base and "+" not in n]
        if not any(res["rows"][n].get("base_build") == build for n in known):
            # the first build of this base, or another (a rebuilt one: its own row, named by its build)
            name = base if not known else f"{base} (build {build})"
            ppl = perplexity(model, tok, "shakespeare", seq_len=512, max_windows=args.windows).ppl
            res["rows"][name] = {"ppl": ppl, "seconds": seconds, "base_build": build}
            log.info("%s: ppl %.3f", name, ppl)
            save()
        runs = [(mode, mcc, lr) for mode in args.modes
                for mcc in (args.max_code_change if mode == "pv" else [MAX_CODE_CHANGE])
                for lr in (args.code_lr if mode != "p_only" else [CODE_LR])]  # P-only has no V step
        for mode, mcc, lr in runs:
            trust = args.trust_ratio or None
            name = (f"{base}+{mode}" + ("" if args.steps == STEPS else f"@{args.steps}steps")
                    + ("" if mcc == MAX_CODE_CHANGE else f"/mcc{mcc:g}")
                    + ("" if lr == CODE_LR else f"/lr{lr:g}")
                    + ("" if trust is None or mode == "p_only" else f"/trust{trust:g}"))  # P-only changes no code
            if name in res["rows"] and res["rows"][name].get("base_build") != build:
                name = f"{name} (build {build})"  # the same mode from another build of the base
            if name in res["rows"]:
                continue
            student = copy.deepcopy(model)
            pv = PVTuning(mode=mode, steps=args.steps, batch_size=args.batch, microbatch_size=2, beam_size=args.beam,
                          max_code_change=mcc, code_lr=lr, code_trust_ratio=trust, teacher_model=dense, eval_windows=held_out, eval_every=args.eval_every)
            student = pv(student, calib)
            r = pv.report_
            ppl = perplexity(student, tok, "shakespeare", seq_len=512, max_windows=args.windows).ppl
            res["rows"][name] = {"ppl": ppl, "seconds": r.seconds, "history": r.history, "eval_steps": r.eval_steps,
                                 "eval_ppl": r.eval_ppl, "code_change": r.code_change,
                                 "beam": args.beam if base.startswith("aqlm") else None, "steps": args.steps,
                                 "base_build": build, "trust": trust,
                                 "max_code_change": mcc if mode == "pv" else None,
                                 "code_lr": lr if mode != "p_only" else None}
            log.info("%s: ppl %.3f (%s)", name, ppl, r.summary())
            save()
            del student
    (RESULTS / "PV_TUNING.md").write_text(markdown(res))
    plot(res, RESULTS / "pv_tuning.png")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
