"""Knowledge distillation at equal steps: KD against LoRA cross-entropy after layer removal and
slicing, and several teachers against one (issue #16).

    python -m benchmarks.distill                      # both parts
    python -m benchmarks.distill --part multi --steps-multi 16

Part ``recovery``: from ``smollm2-135m`` the scoreboard's ``shortgpt-8`` (8 of 30 layers
removed, Block Influence on 16 windows) and ``slicegpt-25`` (PCA on 64 windows); each is
recovered twice with the same LoRA (r=32, alpha=10, dropout 0.05, lr 1e-3, warm-up 10%, cosine,
AdamW β 0.9/0.95, ``--steps`` steps of 4 windows of 512 tokens from the protocol's calibration
windows in one seeded order) — once on next-token cross-entropy (``Distill(ce_weight=1)``, the
baseline), once on the forward KL to the dense model computed on the fly (KD). The dense model
fine-tuned the same way on cross-entropy is the reference (as the scoreboard's ``dense-rft``).
A third recovery, KD with a corrected teacher, distils from that fine-tuned dense model instead —
Minitron's teacher correction, ``Distill(teacher_correction_steps=--steps)``: the teacher is first
fine-tuned with the same LoRA on cross-entropy over the same windows (which is exactly the
``dense + CE`` training, so it is trained once here and handed to both rows as ``teacher_model``;
``tests/test_distill.py`` checks that the option equals this); its training time is recorded
beside the row's own. The fourth recovery, KD + CE, mixes both losses in equal parts
(``ce_weight=0.5``: Hinton et al.'s soft and hard targets) with the corrected teacher; the fifth is the
same with the KL at temperature 2 (``temperature=2``, scaled by T² as Hinton et al. do), which weighs
the teacher's low-probability tokens more. Two more add to KD + CE: TinyBERT's hidden-state matching
(``hidden_weight=1``: every student block's residual state mapped by a learned projection onto the
teacher's at the same depth, normalised MSE; the richer signal per token that Minitron adds when
distilling a pruned model), and DistiLLM's skew KL in place of the forward KL (``loss="skew_kl"``,
λ = 0.1: KL to a mix of 10% teacher and 90% student, bounded gradients early in training). The last
two distil from a teacher fine-tuned on the domain as Minitron corrects its teacher — the full
fine-tune of ``benchmarks.bitdelta --stage finetune`` (150 steps of 4 x 128 tokens of
Shakespeare train windows drawn with another seed, lr 1e-4; the multi part's Shakespeare teacher) — with the KL alone and
half KL, half cross-entropy; the student's own training is unchanged (same windows, same steps).
Gap recovered = (start ppl − ppl) / (start ppl − dense ppl).
``--steps N`` other than 16 trains rows of their own, named ``… (N steps)`` (the corrected teacher
too: trained for N steps); ``--recoveries`` picks some of the recoveries.

Part ``multi``: two teachers that are better on different domains — the full fine-tunes of
``smollm2-135m`` on Shakespeare and on the Python standard library that ``benchmarks.bitdelta
--stage finetune`` makes (built here when absent) — and one student, ``shortgpt-8``, trained
with the same LoRA on an even mix of both domains (``--steps-multi`` steps of 4 windows): from
each teacher alone, from both averaged in probability (static mix, equal weights), with the
teachers weighted per window by their confidence on it (CA-MKD; dynamic teacher selection), and
the static mix with dynamic data selection (the half of each batch the student is most uncertain
on; same forward and backward passes, so equal compute). Every model is scored on both test
splits; the domain average is the mean of the two log-perplexities (the mean NLL, in nats).

Perplexity: test splits, seq_len 512, ``--windows`` windows. The held-out curve during training
uses the first ``--eval-windows`` test windows (part multi: that many of each domain). Rows
already in ``distill.json`` are kept (delete it, or its rows, to re-run). Writes
``results/distill/distill.json``, ``DISTILL.md`` and ``distill.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import torch

import llmdeploy
from llmdeploy.data import calibration
from llmdeploy.distill import Distill
from llmdeploy.eval import perplexity
from llmdeploy.eval.perplexity import test_windows
from llmdeploy.prune import ShortGPT, SliceGPT

from . import bitdelta

RESULTS = Path(__file__).resolve().parent / "results" / "distill"
MODEL = "smollm2-135m"
SEQ = 512
LORA = {"train": "lora", "lora_rank": 32, "lora_alpha": 10.0, "lora_dropout": 0.05, "lr": 1e-3, "batch_size": 4,
        "microbatch_size": 2, "warmup": 0.1}
STARTS = {  # as benchmarks/methods.py registers them
    "shortgpt-8": (lambda: ShortGPT(n_remove=8, n_samples=16), 16),
    "slicegpt-25": (lambda: SliceGPT(sparsity=0.25), 64),
}
RECOVERIES = ("CE", "KD", "KD, corrected teacher", "KD + CE, corrected teacher", "KD (T=2) + CE, corrected teacher",
              "KD + CE + hidden states, corrected teacher", "skew KD + CE, corrected teacher",
              "KD, fine-tuned teacher", "KD + CE, fine-tuned teacher")
DOMAINS = ("shakespeare", "pystdlib")
MULTI = {  # row -> (teachers, Distill options)
    "teacher shakespeare": (("shakespeare",), {}),
    "teacher pystdlib": (("pystdlib",), {}),
    "both, mean of probabilities": (DOMAINS, {"teacher_combine": "mean_prob"}),
    "both, per-window confidence (CA-MKD)": (DOMAINS, {"teacher_combine": "confidence"}),
    "both, mean of probabilities + data selection 50%": (DOMAINS, {"teacher_combine": "mean_prob",
                                                                    "select_fraction": 0.5, "microbatch_size": 4}),
}
log = logging.getLogger("benchmarks.distill")


def _ppl(model, tok, corpus: str, windows: int) -> float:
    return perplexity(model.eval(), tok, corpus, seq_len=SEQ, max_windows=windows).ppl


def _train(student: torch.nn.Module, data: torch.Tensor, **kw) -> tuple[torch.nn.Module, dict]:
    """One Distill run; its curve, wall and CPU seconds."""
    d = Distill(**{**LORA, **kw})
    c0 = time.process_time()
    student = d(student, data)
    r = d.report_
    tokens = d.batch_size * data.shape[1]
    return student, {"history": r.history, "eval_tokens": [s * tokens for s in r.eval_steps], "eval_ppl": r.eval_ppl,
                     "steps": d.steps, "tokens": d.steps * tokens, "seconds": r.seconds,
                     "cpu_seconds": time.process_time() - c0, "trained_params": r.trained_params}


def _environment() -> dict:
    import transformers

    return {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "transformers": transformers.__version__}


def part_recovery(res: dict, dense, tok, args, save) -> None:
    rows = res.setdefault("recovery", {})
    calib = calibration(tok, "shakespeare", n_samples=128, seq_len=SEQ, seed=0)
    held_out = test_windows(tok, "shakespeare", SEQ, args.eval_windows)
    curve = {"eval_windows": held_out, "eval_every": args.eval_every}
    if "dense" not in rows:  # the same measurement as part multi's (same model, split and windows)
        rows["dense"] = {"ppl": _ppl(dense, tok, "shakespeare", args.windows), "env": _environment()}
        save()
    corrected = None
    # rows at the default 16 steps keep their names; other step counts are rows of their own
    suffix = "" if args.steps == 16 else f" ({args.steps} steps)"

    def corrected_teacher():  # dense + CE: Distill(teacher_correction_steps=steps) trains exactly this
        nonlocal corrected
        if corrected is None:
            model, info = _train(copy.deepcopy(dense), calib, ce_weight=1.0, steps=args.steps, **curve)
            corrected = model.eval(), info
            if "dense + CE" + suffix not in rows:
                rows["dense + CE" + suffix] = {"ppl": _ppl(model, tok, "shakespeare", args.windows), **info, "env": _environment()}
                save()
        return corrected

    fine_tuned = None

    def fine_tuned_teacher():  # Minitron's teacher correction as a full fine-tune on the domain
        nonlocal fine_tuned
        if fine_tuned is None:
            model = _teacher("shakespeare")
            done = json.loads((bitdelta.FINETUNES / "shakespeare" / "done.json").read_text())
            fine_tuned = model, {"seconds": done["seconds"]}
            if "fine-tuned teacher" not in rows:
                rows["fine-tuned teacher"] = {"ppl": _ppl(model, tok, "shakespeare", args.windows),
                                              "seconds": done["seconds"], "fine_tune": {
                                                  k: done[k] for k in ("steps", "batch_size", "seq_len", "lr")},
                                              "env": _environment()}
                save()
        return fine_tuned

    for start, (make, n_calib) in STARTS.items():
        if start not in args.starts:
            continue
        todo = [n for n in (start, *(f"{start} + {label}{suffix}" for label in args.recoveries)) if n not in rows]
        if not todo:
            continue
        t0 = time.perf_counter()
        base = make()(copy.deepcopy(dense), calib[:n_calib])
        if start not in rows:
            rows[start] = {"ppl": _ppl(base, tok, "shakespeare", args.windows), "seconds": time.perf_counter() - t0,
                           "env": _environment()}
            save()
        for label in args.recoveries:
            name = f"{start} + {label}{suffix}"
            if name in rows:
                continue
            extra = {}
            if label == "CE":
                kw = {"ce_weight": 1.0}
            elif label == "KD":
                kw = {"teacher_model": dense}
            elif label.endswith("fine-tuned teacher"):
                teacher, fix = fine_tuned_teacher()
                kw = {"teacher_model": teacher, "ce_weight": 0.5 if "+ CE" in label else 0.0}
                extra = {"teacher_correction_seconds": fix["seconds"]}
            else:
                teacher, fix = corrected_teacher()
                kw = {"teacher_model": teacher, "ce_weight": 0.5 if "+ CE" in label else 0.0,
                      "temperature": 2.0 if "(T=2)" in label else 1.0,
                      "hidden_weight": 1.0 if "hidden states" in label else 0.0,
                      "loss": "skew_kl" if label.startswith("skew") else "forward_kl", "skew": 0.1}
                extra = {"teacher_correction_seconds": fix["seconds"], "teacher_correction_cpu_seconds": fix["cpu_seconds"]}
            model, info = _train(copy.deepcopy(base), calib, steps=args.steps, **curve, **kw)
            rows[name] = {"ppl": _ppl(model, tok, "shakespeare", args.windows), **info, **extra, "env": _environment()}
            log.info("%s: ppl %.3f", name, rows[name]["ppl"])
            save()
    if "dense + CE" + suffix not in rows:  # the reference: the dense model fine-tuned the same way
        corrected_teacher()


def _teacher(domain: str):
    path = bitdelta.FINETUNES / domain
    if not (path / "done.json").exists():
        bitdelta.stage_finetune([domain], steps=150, batch=4, seq_len=128, lr=1e-4)
    model, _ = llmdeploy.load(path / "model")
    return model.eval()


def part_multi(res: dict, dense, tok, args, save) -> None:
    rows = res.setdefault("multi", {})
    every = {d: lambda m, d=d: _ppl(m, tok, d, args.windows) for d in DOMAINS}
    teachers = {d: _teacher(d) for d in DOMAINS}
    for d, t in teachers.items():
        if f"fine-tune {d} (teacher)" not in rows:
            rows[f"fine-tune {d} (teacher)"] = {"ppl": {c: every[c](t) for c in DOMAINS}}
            save()
    if "dense" not in rows:
        rows["dense"] = {"ppl": {c: every[c](dense) for c in DOMAINS}}
        save()
    n = args.steps_multi * LORA["batch_size"]
    data = bitdelta.domain_windows(tok, "mix", n, SEQ, seed=0)
    held_out = torch.cat([test_windows(tok, d, SEQ, args.eval_windows) for d in DOMAINS])
    calib = calibration(tok, "shakespeare", n_samples=16, seq_len=SEQ, seed=0)
    student = STARTS["shortgpt-8"][0]()(copy.deepcopy(dense), calib)
    if "shortgpt-8 (student start)" not in rows:
        rows["shortgpt-8 (student start)"] = {"ppl": {c: every[c](student) for c in DOMAINS}}
        save()
    for name, (names, kw) in MULTI.items():
        if name in rows:
            continue
        ts = [teachers[t] for t in names]
        model, info = _train(copy.deepcopy(student), data, steps=args.steps_multi, eval_windows=held_out,
                             eval_every=args.eval_every_multi, teacher_model=ts if len(ts) > 1 else ts[0], **kw)
        rows[name] = {"ppl": {c: every[c](model) for c in DOMAINS}, **info}
        log.info("%s: %s", name, rows[name]["ppl"])
        save()


def _mean_nll(ppl: dict) -> float:
    return sum(math.log(v) for v in ppl.values()) / len(ppl)


def markdown(res: dict) -> str:
    m = res["meta"]
    out = [f"# Knowledge distillation on `{MODEL}` (`python -m benchmarks.distill`, {m['date']})", "",
           f"Perplexity: test splits, seq_len {SEQ}, {m['windows']} windows. Every training row: the same LoRA "
           "(r=32, alpha=10, dropout 0.05, lr 1e-3, 10% warm-up then cosine, AdamW), windows of 512 tokens in "
           "batches of 4, one seeded order. Seconds: wall time of the training alone (CPU seconds of the process "
           f"beside it); {m['threads']} CPU threads.", ""]
    def measured(rows: dict) -> list[str]:
        envs: dict[tuple[str, str], set[str]] = {}
        for r in rows.values():
            if "env" in r:
                envs.setdefault((r["env"]["torch"], r["env"]["transformers"]), set()).add(r["env"]["date"])
        older = [n for n, r in rows.items() if "env" not in r]
        out = [f"Rows measured on {' and '.join(sorted(d))} (torch {t}, transformers {v})"
               + (" except those marked †" if older else "") + "." for (t, v), d in sorted(envs.items())]
        if older and envs:
            out.append("† measured earlier in another environment (an earlier transformers); the rows measured "
                       "again here reproduce their earlier 128-window perplexities to 0.001. The † rows' curves "
                       "during training were taken on other held-out windows (their step 0 differs from the "
                       "same model's here): compare their final perplexities only.")
        elif older:
            out.append("Measured on 2026-11-29 in an earlier environment (an earlier transformers).")
        return [" ".join(out), ""] if out else []

    rec = res.get("recovery")
    if rec:
        dense = rec["dense"]["ppl"]
        out += ["## Recovery after compression: KD against cross-entropy at equal steps", "", *measured(rec),
                f"Shakespeare; dense {dense:.3f}. CE: next-token cross-entropy on the calibration windows "
                "(shakespeare train); KD: forward KL to the dense model on the same windows; KD, corrected "
                "teacher: forward KL to `dense + CE` (Minitron's teacher correction: the teacher first fine-tuned "
                "the same way on the same windows; its training seconds are added after a +); KD + CE: half "
                "that KL, half the cross-entropy (`ce_weight=0.5`), same teacher; KD (T=2) + CE: the same with the KL "
                "at temperature 2, times 4; KD + CE + hidden states: KD + CE plus the normalised MSE between each student "
                "block's output, through a learned projection, and the teacher's at the same depth (weight 1, "
                "TinyBERT's intermediate-layer loss); skew KD + CE: KD + CE with DistiLLM's skew KL (λ = 0.1) in "
                "place of the forward KL; KD, fine-tuned teacher: forward KL to a full fine-tune of the dense "
                "model on windows of the same train split drawn with another seed (`benchmarks.bitdelta --stage finetune`: "
                "150 steps of 4 x 128 tokens, lr 1e-4; row \"fine-tuned teacher\", its seconds added after a +), "
                "Minitron's teacher correction done as that paper does it, on the distillation domain rather than "
                "only on the student's windows; KD + CE, fine-tuned teacher: half that KL, half the cross-entropy. "
                "Gap recovered = "
                "(start − ppl) / (start − dense).", "",
                "| model | ppl | gap recovered | steps x windows | tokens | held-out ppl during training "
                "(tokens: ppl) | seconds (CPU s) |", "|---|---|---|---|---|---|---|"]
        for name, r in rec.items():
            start = rec.get(name.split(" + ")[0], {}).get("ppl")
            gap = "" if " + " not in name or name.startswith("dense") else \
                f"{(start - r['ppl']) / (start - dense):.1%}"
            curve = ", ".join(f"{t // 1000}k: {p:.1f}" for t, p in zip(r.get("eval_tokens", []), r.get("eval_ppl", [])))
            steps = f"{r['steps']} x 4" if "steps" in r else ""
            secs = f"{r['seconds']:.0f} ({r['cpu_seconds']:.0f})" if "cpu_seconds" in r else \
                (f"{r['seconds']:.0f}" if "seconds" in r else "")
            if "teacher_correction_seconds" in r:
                cpu = r.get("teacher_correction_cpu_seconds")
                secs += f" + {r['teacher_correction_seconds']:.0f}" + ("" if cpu is None else f" ({cpu:.0f})")
            mark = "" if "env" in r else " †"
            out.append(f"| {name}{mark} | {r['ppl']:.3f} | {gap} | {steps} | {r.get('tokens', '')} | {curve} | {secs} |")
        out.append("")
    multi = res.get("multi")
    if multi:
        out += ["## Several teachers: two domain experts, one student", "", *measured(multi),
                "Teachers: full fine-tunes of the dense model on Shakespeare and on the Python standard library "
                "(`benchmarks.bitdelta --stage finetune`). Student: `shortgpt-8`, trained on an even mix of both "
                "train splits. Mean NLL: the average over the two domains of log perplexity (lower is better).", "",
                "| model | shakespeare ppl | pystdlib ppl | mean NLL (nats) | steps x windows | held-out ppl "
                "(both domains) during training (tokens: ppl) | seconds (CPU s) |", "|---|---|---|---|---|---|---|"]
        for name, r in multi.items():
            p = r["ppl"]
            curve = ", ".join(f"{t // 1000}k: {q:.2f}" for t, q in zip(r.get("eval_tokens", []), r.get("eval_ppl", [])))
            steps = f"{r['steps']} x 4" if "steps" in r else ""
            secs = f"{r['seconds']:.0f} ({r['cpu_seconds']:.0f})" if "seconds" in r else ""
            out.append(f"| {name} | {p['shakespeare']:.3f} | {p['pystdlib']:.3f} | {_mean_nll(p):.4f} | {steps} | "
                       f"{curve} | {secs} |")
        out.append("")
    return "\n".join(out)


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"{s}: recovery", res.get("recovery", {}), s) for s in STARTS] + \
        [("shortgpt-8: several teachers (both domains)", res.get("multi", {}), None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, rows, start) in zip(axes[0], panels):
        for name, r in rows.items():
            if not r.get("eval_tokens") or (start and not name.startswith(start)):
                continue
            label = name if start is None else name[len(start) + 3:]
            older = start is not None and "env" not in r  # measured earlier, on other held-out windows
            ax.plot(r["eval_tokens"], r["eval_ppl"], marker="o", ls="--" if older else "-",
                    label=label + (" † (other held-out windows)" if older else ""))
        if start and "dense" in rows:
            ax.axhline(rows["dense"]["ppl"], color="gray", ls="--", label="dense (128 windows)")
        ax.set(title=title, xlabel="training tokens", ylabel="held-out perplexity")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", default=["recovery", "multi"], choices=["recovery", "multi"])
    p.add_argument("--starts", nargs="+", default=list(STARTS), choices=list(STARTS),
                   help="compressed models of part recovery to train (the others' rows are kept)")
    p.add_argument("--steps", type=int, default=16,
                   help="training steps of part recovery (rows at other than 16 are named with their steps)")
    p.add_argument("--recoveries", nargs="+", default=list(RECOVERIES), choices=list(RECOVERIES),
                   help="recoveries of part recovery to train (the others' rows are kept)")
    p.add_argument("--steps-multi", type=int, default=16)
    p.add_argument("--windows", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=8)
    p.add_argument("--eval-every-multi", type=int, default=4)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "distill.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    res["meta"] = {"date": time.strftime("%Y-%m-%d"), "windows": args.windows, "threads": torch.get_num_threads()}

    def save() -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(path)
        (RESULTS / "DISTILL.md").write_text(markdown(res))

    dense, tok = llmdeploy.load(MODEL)
    dense.eval()
    for part in args.part:
        {"recovery": part_recovery, "multi": part_multi}[part](res, dense, tok, args, save)
    save()
    plot(res, RESULTS / "distill.png")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
