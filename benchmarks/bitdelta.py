"""BitDelta on SmolLM2-135M: real fine-tunes, their 1-bit deltas, and multi-tenant serving.

    python -m benchmarks.bitdelta --stage finetune     # the fine-tunes (cached, not in git)
    python -m benchmarks.bitdelta --stage finetune --steps 150 --only shakespeare

    python -m benchmarks.bitdelta --stage compress     # BitDelta + baselines, own-domain perplexity

Stage ``finetune``: full-parameter fine-tunes of ``smollm2-135m`` (``llmdeploy.finetune.FullFinetune``:
AdamW, cosine schedule) on four shipped domains — the Shakespeare train split, the Python
standard library's sources (``pystdlib``, code), an even mix of both, and Python's reference
documentation (``pydocs``, technical English) — each saved under
``benchmarks/results/bitdelta/finetunes/<domain>/`` with its training curve; resumable.

Stage ``compress``: for each fine-tune, BitDelta before and after scale distillation (the paper's
200 steps of 4 x 128 tokens, lr 1e-4, on fresh windows of the fine-tune's domain), the low-rank
(SVD) delta at BitDelta's byte budget and 1-bit RTN of the delta (groups of 128), and the
fine-tune's own linears on the base's other tensors (the ceiling of any delta of the linears:
embeddings, norms and head stay the base's so that tenants share them); perplexity on the
domain's test split (seq_len 512, 128 windows or all the split has: ``pydocs`` has 47; ``mix``
on both corpora), the share of the fine-tune's gain over the base each recovers, and sizes.
Rows already in ``bitdelta.json`` are kept (``--redo distilled|all`` recomputes). Writes
``bitdelta.json``, ``BITDELTA.md`` and ``bitdelta.png`` (training and distillation curves).

Stage ``serve``: a batch of 8 rows over the four tenants, ``MultiTenant`` (one base + deltas) against
the dense fine-tunes run one after another, in the same process, interleaved rounds; memory.
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
from llmdeploy.finetune import FullFinetune

RESULTS = Path(__file__).resolve().parent / "results" / "bitdelta"
FINETUNES = RESULTS / "finetunes"
MODEL = "smollm2-135m"
DOMAINS = ("shakespeare", "pystdlib", "mix", "pydocs")
log = logging.getLogger("benchmarks.bitdelta")


def domain_windows(tok, domain: str, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """Training windows of a domain (``mix``: half of each corpus, interleaved)."""
    if domain == "mix":
        a = calibration(tok, "shakespeare", n_samples=n // 2, seq_len=seq_len, seed=seed)
        b = calibration(tok, "pystdlib", n_samples=n - n // 2, seq_len=seq_len, seed=seed)
        return torch.stack([w for pair in zip(a, b) for w in pair] + list(b[len(a):]))
    return calibration(tok, domain, n_samples=n, seq_len=seq_len, seed=seed)


def stage_finetune(domains, steps: int, batch: int, seq_len: int, lr: float) -> None:
    for domain in domains:
        out = FINETUNES / domain
        if (out / "done.json").exists():
            log.info("fine-tune %s cached at %s", domain, out)
            continue
        model, tok = llmdeploy.load(MODEL)
        data = domain_windows(tok, domain, steps * batch, seq_len, seed=1)
        ft = FullFinetune(steps=steps, lr=lr, batch_size=batch, gradient_checkpointing=False,
                          checkpoint_dir=str(out / "state"), resume=True, save_every=25)
        t0 = time.perf_counter()
        model = ft(model, data)
        llmdeploy.save(model, tok, out / "model")
        (out / "done.json").write_text(json.dumps({
            "domain": domain, "steps": steps, "batch_size": batch, "seq_len": seq_len, "lr": lr,
            "seconds": ft.report_.seconds, "wall_seconds_this_run": time.perf_counter() - t0,
            "history": ft.report_.history, "lr_schedule": ft.report_.lr}, indent=1))
        log.info("fine-tune %s: %s", domain, ft.report_.summary())


EVAL = {"shakespeare": ["shakespeare"], "pystdlib": ["pystdlib"], "mix": ["shakespeare", "pystdlib"],
        "pydocs": ["pydocs"]}
DISTILLED = "BitDelta, scales distilled"
EXTRA = ("fine-tune's linears, base's other tensors (ceiling)", "RTN of the delta, 1 bit, groups of 128")
EMB_INIT = "BitDelta + embedding delta (per-row scales), at init"
EMB_DISTILLED = "BitDelta + embedding delta (per-row scales), distilled"
MT, DENSE = "MultiTenant (one base, per-row deltas)", "dense fine-tunes one after another"


def _ppl(model, tok, corpus: str, windows: int) -> float:
    from llmdeploy.eval import perplexity
    r = perplexity(model, tok, corpus, seq_len=512, max_windows=windows)
    WINDOWS[corpus] = r.n_windows
    return r.ppl


WINDOWS: dict[str, int] = {}


def linears_only(base, ft):
    """The base's tree with the fine-tune's decoder linears (shared, not copied)."""
    from llmdeploy.delta.bitdelta import shallow_clone
    from llmdeploy.models.adapters import get_adapter
    out = shallow_clone(base)
    for name in get_adapter(ft).linear_names():
        out.set_submodule(name, ft.get_submodule(name))
    return out


def stage_compress(domains, windows: int, steps: int, evaluate: bool = True, redo: str | None = None,
                   core: bool = False) -> dict:
    from llmdeploy.delta import BitDelta, LowRankDelta, RTNDelta, load_delta, save_delta

    path = RESULTS / "bitdelta.json"
    res = json.loads(path.read_text()) if path.exists() else {"base": {}, "domains": {}}
    res["meta"] = {"model": MODEL, "windows": windows, "seq_len": 512, "distill_steps": steps,
                   "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads()}
    res.setdefault("windows", {})
    base, tok = llmdeploy.load(MODEL)
    base.eval()
    for corpus in sorted({c for d in domains for c in EVAL[d]} if evaluate else ()):
        if corpus not in res["base"]:
            res["base"][corpus] = _ppl(base, tok, corpus, windows)
            res["windows"][corpus] = WINDOWS[corpus]
            log.info("base ppl on %s: %.3f", corpus, res["base"][corpus])
            path.write_text(json.dumps(res, indent=2))
    for domain in domains:
        ft, _ = llmdeploy.load(str(FINETUNES / domain / "model"))
        ft.eval()
        calib = domain_windows(tok, domain, steps * 4, 128, seed=2)
        rows = {} if redo == "all" else res["domains"].get(domain, {})
        if redo == "distilled":
            rows.pop(DISTILLED, None)
            rows.pop(EMB_DISTILLED, None)
        res["domains"][domain] = rows

        def record(label, model, seconds=None, nbytes=None, domain=domain, rows=rows, **extra):
            if not evaluate:
                return
            ppl = {c: _ppl(model, tok, c, windows) for c in EVAL[domain]}
            rows[label] = {"ppl": ppl, "seconds": seconds, "delta_bytes": nbytes, **extra}
            log.info("%s %s: %s", domain, label, {k: v for k, v in rows[label].items() if k != "history"})
            path.write_text(json.dumps(res, indent=2))

        def todo(label, rows=rows):
            return evaluate and label not in rows and not (core and label in EXTRA)

        if todo("fine-tune (dense)"):
            record("fine-tune (dense)", ft)
        if todo("fine-tune's linears, base's other tensors (ceiling)"):
            record("fine-tune's linears, base's other tensors (ceiling)", linears_only(base, ft))
        for embeddings in (False, True):
            init_label, dist_label = ("BitDelta, scales at init", DISTILLED) if not embeddings else \
                (EMB_INIT, EMB_DISTILLED)
            bd = BitDelta(base=base, steps=steps, lr=1e-4, batch_size=4, embeddings=embeddings)
            if todo(init_label):
                record(init_label, bd.compress(ft), nbytes=bd.report_.delta_bytes, fp16_bytes=bd.report_.fp16_bytes)
            stem = FINETUNES / domain / ("bitdelta-emb" if embeddings else "bitdelta")
            delta_file, sidecar = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
            fresh = dist_label not in rows and (  # the row is wanted and no delta of this run is saved
                redo in ("distilled", "all") or not (delta_file.exists() and sidecar.exists()))
            if fresh:  # distil, save the delta and what the run measured beside it
                t0 = time.perf_counter()
                model = bd(ft, calib)
                r = bd.report_
                info = {"seconds": time.perf_counter() - t0, "delta_bytes": r.delta_bytes, "fp16_bytes": r.fp16_bytes,
                        "file_bytes": save_delta(model, delta_file, base).stat().st_size,
                        "distill_loss": [r.init_loss, r.final_loss], "history": r.history}
                sidecar.write_text(json.dumps(info))
            if todo(dist_label):  # a delta made earlier (e.g. by --no-eval) is loaded, not distilled again
                info = json.loads(sidecar.read_text())
                model = model if fresh else load_delta(base, delta_file)
                record(dist_label, model, seconds=info["seconds"], nbytes=info["delta_bytes"],
                       fp16_bytes=info["fp16_bytes"], file_bytes=info["file_bytes"],
                       distill_loss=info["distill_loss"], history=info["history"])
                if not embeddings:
                    res["fp16_linear_bytes"] = info["fp16_bytes"]
        model = None
        for label, comp in (("low-rank delta (SVD), same bytes", LowRankDelta(base=base)),
                            ("RTN of the delta, 1 bit, groups of 128", RTNDelta(base=base, bits=1, group_size=128))):
            if todo(label):
                record(label, comp(ft, None), nbytes=comp.report_.delta_bytes)
        del ft
    path.write_text(json.dumps(res, indent=2))
    (RESULTS / "BITDELTA.md").write_text(markdown(res))
    plot(res)
    return res


def plot(res: dict) -> None:
    """Fine-tuning curves (from each fine-tune's done.json) and scale-distillation curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for domain in DOMAINS:
        done = FINETUNES / domain / "done.json"
        if done.exists():
            h = json.loads(done.read_text())["history"]
            axes[0].plot(range(1, len(h) + 1), h, label=domain, alpha=0.8)
        for label, style in ((DISTILLED, "-"), (EMB_DISTILLED, ":")):
            h = res["domains"].get(domain, {}).get(label, {}).get("history")
            if h:
                name = domain if label == DISTILLED else f"{domain} + embedding delta"
                axes[1].plot(range(1, len(h) + 1), h, style, label=name, alpha=0.8)
    axes[0].set(xlabel="step", ylabel="training loss (cross-entropy)", title="full fine-tunes of smollm2-135m")
    axes[1].set(xlabel="step", ylabel="logit MSE to the fine-tune", yscale="log",
                title="BitDelta scale distillation")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "bitdelta.png", dpi=100)


def stage_serve(rounds: int, new_tokens: int = 32) -> dict:
    """One batch whose rows belong to different fine-tunes: MultiTenant (one base + deltas) against
    each dense fine-tune generating its own rows, one after another; memory of both deployments."""
    import statistics

    from llmdeploy.data.calibration import tokenize_text
    from llmdeploy.data.corpora import load_text
    from llmdeploy.delta import MultiTenant, load_delta
    from llmdeploy.models.adapters import get_adapter

    base, tok = llmdeploy.load(MODEL)
    base.eval()
    names = [d for d in DOMAINS if (FINETUNES / d / "bitdelta.safetensors").exists()]
    deltas = {d: load_delta(base, FINETUNES / d / "bitdelta.safetensors") for d in names}
    dense = {d: llmdeploy.load(str(FINETUNES / d / "model"))[0].eval() for d in names}
    server = MultiTenant(base, deltas)
    rows = [names[i % len(names)] for i in range(8)]
    text = load_text("shakespeare", "test") + load_text("pystdlib", "test")
    ids = tokenize_text(tok, text[:20000])[: 8 * 64].reshape(8, 64)
    gen = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "pad_token_id": 0}
    first = dict(gen, max_new_tokens=1, min_new_tokens=1)
    times = {f"{k} {what}": [] for k in (MT, DENSE) for what in ("generate", "prefill")}
    with torch.no_grad():
        for _ in range(rounds):  # interleaved: both deployments see the same machine state
            for what, kw in (("generate", gen), ("prefill", first)):
                t0 = time.perf_counter()
                out = server.generate(ids, rows, **kw)
                times[f"{MT} {what}"].append(time.perf_counter() - t0)
                if what == "generate":
                    mixed = out
                t0 = time.perf_counter()
                for d in names:
                    sel = [i for i, r in enumerate(rows) if r == d]
                    dense[d].generate(ids[sel], **kw)
                times[f"{DENSE} {what}"].append(time.perf_counter() - t0)
            log.info("serve round: %s", {k: round(v[-1], 2) for k, v in times.items()})
    agree = [torch.equal(mixed[i], deltas[r].generate(ids[i:i + 1], **gen)[0]) for i, r in enumerate(rows)]
    param_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    linears = [base.get_submodule(n) for n in get_adapter(base).linear_names()]
    fp16_linears = sum(2 * m.weight.numel() for m in linears)
    out = {"tenants": names, "rows": rows, "prompt_len": 64, "new_tokens": new_tokens, "rounds": rounds,
           "median_s": {k: statistics.median(v) for k, v in times.items()}, "all_s": times,
           "tokens": 8 * new_tokens, "rows_equal_each_tenant_alone": agree,
           "memory_bytes": {"base": param_bytes, "deltas": server.delta_bytes(),
                            "dense fine-tunes": len(names) * param_bytes,
                            "bound: base + N x fp16 linears / 16": param_bytes + len(names) * fp16_linears // 16}}
    path = RESULTS / "bitdelta.json"
    res = json.loads(path.read_text()) if path.exists() else {"base": {}, "domains": {}}
    res["serve"] = out
    path.write_text(json.dumps(res, indent=2))
    (RESULTS / "BITDELTA.md").write_text(markdown(res))
    return res


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# BitDelta on `{m['model']}` (`python -m benchmarks.bitdelta`, {m['date']})", "",
             f"Perplexity on each domain's test split, seq_len {m['seq_len']}, {m['windows']} windows"
             + "".join(f" ({c}: the {n} its test split has)" for c, n in res.get("windows", {}).items()
                       if n < m["windows"]) + "; scale "
             f"distillation {m['distill_steps']} steps of 4 x 128 tokens (lr 1e-4). Gain recovered = "
             "(base ppl - ppl) / (base ppl - fine-tune ppl). fp16 copy of the decoder linears: "
             f"{res.get('fp16_linear_bytes', 0) / 2**20:.1f} MiB. The embedding-delta rows (an extension, "
             "not in the paper: `BitDelta(embeddings=True)`, the tied embedding/head gets a 1-bit delta "
             "with one scale per vocabulary row) compare with fp16 linears + embedding.", "",
             "| fine-tune | model | test corpus | ppl | gain recovered | delta MiB | x smaller than fp16 |",
             "|---|---|---|---|---|---|---|"]
    for domain, rows in res["domains"].items():
        ft = rows.get("fine-tune (dense)")
        order = ["fine-tune (dense)", EXTRA[0], "BitDelta, scales at init", DISTILLED,
                 "low-rank delta (SVD), same bytes", EXTRA[1], EMB_INIT, EMB_DISTILLED]
        for label, r in sorted(rows.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
            for corpus, ppl in r["ppl"].items():
                base = res["base"][corpus]
                gain = (base - ppl) / (base - ft["ppl"][corpus]) if ft and base != ft["ppl"][corpus] else float("nan")
                size = f"{r['delta_bytes'] / 2**20:.2f}" if r.get("delta_bytes") else ""
                fp16 = r.get("fp16_bytes") or res["fp16_linear_bytes"]  # embedding rows: linears + embedding
                ratio = f"{fp16 / r['delta_bytes']:.1f}" if r.get("delta_bytes") else ""
                lines.append(f"| {domain} | {label} | {corpus} | {ppl:.3f} | {100 * gain:.1f}% | {size} | {ratio} |")
    lines += ["", "Base model: " + ", ".join(f"{c} {p:.3f}" for c, p in res["base"].items()), ""]
    if "serve" in res:
        sv = res["serve"]
        mem = sv["memory_bytes"]
        lines += ["## Serving several fine-tunes", "",
                  f"{len(sv['rows'])} rows over {len(sv['tenants'])} tenants ({', '.join(sv['tenants'])}), prompts of "
                  f"{sv['prompt_len']} tokens, {sv['new_tokens']} greedy tokens each (prefill: the first token only), "
                  f"medians of {sv['rounds']} interleaved rounds, {res['meta'].get('threads', 2)} CPU threads. "
                  f"Every row equals its tenant's BitDelta model alone: {all(sv['rows_equal_each_tenant_alone'])}.", "",
                  "| deployment | generate s | tokens/s | speed-up | prefill s | memory (MiB) |",
                  "|---|---|---|---|---|---|"]
        med = sv["median_s"]
        for name, memory in ((MT, mem["base"] + mem["deltas"]), (DENSE, mem["dense fine-tunes"])):
            g, pf = med[f"{name} generate"], med[f"{name} prefill"]
            lines.append(f"| {name} | {g:.2f} | {sv['tokens'] / g:.1f} | {med[f'{DENSE} generate'] / g:.2f}x | "
                         f"{pf:.2f} | {memory / 2**20:.1f} |")
        bound = mem["bound: base + N x fp16 linears / 16"]
        lines += ["", f"Memory of the multi-tenant deployment: base {mem['base'] / 2**20:.1f} MiB + "
                  f"{len(sv['tenants'])} deltas {mem['deltas'] / 2**20:.2f} MiB = "
                  f"{(mem['base'] + mem['deltas']) / 2**20:.2f} MiB; goal base + N x (fp16 linears / 16) = "
                  f"{bound / 2**20:.2f} MiB (the signs are exactly 1/16; each delta adds its scales, "
                  f"{(mem['deltas'] - (bound - mem['base'])) // max(1, len(sv['tenants']))} bytes).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["finetune", "compress", "serve"], required=True)
    p.add_argument("--windows", type=int, default=128)
    p.add_argument("--distill-steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-eval", action="store_true", help="compress: only make and save the distilled deltas")
    p.add_argument("--redo", choices=["distilled", "all"], help="compress: recompute rows already recorded")
    p.add_argument("--core", action="store_true", help="compress: only the scoreboard's rows (dense, BitDelta "
                   "before/after distillation, SVD), not the ceiling and RTN")
    p.add_argument("--only", nargs="+", choices=DOMAINS)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.stage == "finetune":
        stage_finetune(args.only or DOMAINS, args.steps, args.batch, args.seq_len, args.lr)
    elif args.stage == "compress":
        print(markdown(stage_compress(args.only or DOMAINS, args.windows, args.distill_steps, not args.no_eval,
                                      args.redo, args.core)))
    elif args.stage == "serve":
        print(markdown(stage_serve(args.rounds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
