"""Faster decoding on ``smollm2-135m``: Medusa, ReDrafter, hidden transfer and draft models on one
verification engine, against plain greedy decoding of the same model in the same run (issue #17).

    python -m benchmarks.decode                       # every stage; finished stages are kept
    python -m benchmarks.decode --stage timing        # re-time only

Stages (results in ``results/decode/decode.json``; delete a key to redo it):

- ``data``: self-distillation data — chunks of 512 prompts of 32 tokens from the Shakespeare
  *train* split (one seed each), each continued by 96 greedy tokens of the model (training: four
  chunks, 2048 sequences, see ``CHUNKS``); 16 more prompts with another seed (validation:
  per-rank accuracy, from which the trees are built). Cached under
  ``results/decode/cache`` (not committed).
- ``train``: Medusa (4 heads), ReDrafter (4 steps ahead) and hidden transfer (4 future positions
  at block 22 of 30) trained with the model frozen, and ``redrafter-fr8k``: a ReDrafter trained for
  the configuration the timing deploys (2 steps ahead, over the fr8k drafting vocabulary with
  ``train_drafter(draft_vocab=True)``, on eight chunks); steps, loss and seconds recorded; weights under
  ``results/decode/drafters`` (not committed; ``load_drafter`` reads them). A drafter trained anew
  has its sweep rows redone; the rows the timing table used stay, under ``sweep_timed``, until the
  next timing run.
- ``drafts``: self-speculation drafts — ShortGPT copies of the model with 15 and 20 of 30 blocks
  removed (Block Influence on 16 calibration windows).
- ``sweep``: held-out prompts (the first 8 windows of 32 tokens of the Shakespeare *test* split,
  never trained on), 64 new tokens, greedy, batch 1: mean tokens per verification step (accepted
  drafts + 1), candidates verified and positions per forward (hidden transfer adds its pseudo
  positions: under every node, or with ``main`` under the first-ranked chain only), per method and
  tree size; every output is checked equal to plain greedy decoding. Rows ``fr8k``: the same
  drafter drafting from the 8192 most frequent tokens of the first 512 training sequences (FR-Spec's drafting
  vocabulary: a sixth of the LM-head rows read per drafting pass). Rows ``int8``: that drafter with
  its linears and its drafting-vocabulary head stored as int8 RTN codes (``Drafter.quantize(8, 64)``,
  the library's quantized kernels), a quarter of the bytes read per drafting pass. Rows
  ``redrafter-fr8k``: the ReDrafter trained over that vocabulary (it drafts from it as saved).
- ``timing``: wall-clock tokens/s of the best configuration of each method (by the sweep's tokens
  per forward-second estimate) against plain decoding — transformers' ``model.generate`` and this
  engine without a drafter — at batch 1 (8 prompts one after another) and batch 4 (two batches),
  ``--repeats`` times; interleaved per prompt group (every decoder decodes a prompt, or a batch of
  4, before the next group; the order rotates), medians over repeats, 2 threads. The engine computes the model's
  linears for up to ``llmdeploy.kernels.rows.MAX_ROWS`` token rows with the row kernel (``generate(row_kernel=True)``); rows marked
  ", BLAS linears" (plain decoding and the fastest method) decode with ``F.linear`` instead.

Writes ``decode.json``, ``DECODE.md`` and ``decode.png`` (accepted length against tree size).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import statistics
import time
from pathlib import Path

import torch

import llmdeploy
from llmdeploy import decode as D
from llmdeploy.data import calibration
from llmdeploy.eval.perplexity import test_windows
from llmdeploy.kernels.rows import MAX_ROWS
from llmdeploy.prune import ShortGPT

RESULTS = Path(__file__).resolve().parent / "results" / "decode"
MODEL = "smollm2-135m"
NEW = 64
log = logging.getLogger("benchmarks.decode")

TRAIN = {  # drafter -> (constructor, training options; "chunks": the data's seeds, default CHUNKS)
    "medusa": (lambda m: D.MedusaHeads.for_model(m, 4, topk=8), {"steps": 4000, "batch": 4, "anchors_per_seq": 16}),
    "redrafter": (lambda m: D.ReDrafter.for_model(m, beam_width=4, beam_length=4),
                  {"steps": 4000, "batch": 4, "anchors_per_seq": 16}),  # Medusa's steps
    "hidden_transfer": (lambda m: D.HiddenTransfer.for_model(m, layer=22, n_future=4, topk=8),
                        {"steps": 400, "batch": 1, "anchors_per_seq": 24}),
    # the ReDrafter the timing deploys, trained for it: two steps ahead (the beam length of its fastest
    # trees), over the fr8k drafting vocabulary it drafts from (train_drafter(draft_vocab=True)), on
    # twice the data (it overfit four chunks: teacher-forced top-1 two tokens ahead 0.73 on training
    # sequences, 0.58 on the validation ones); a step costs an eighth of redrafter's (0.065 against 0.53 s
    # at batch 4), so it takes twice the batch and steps
    "redrafter-fr8k": (lambda m: D.ReDrafter.for_model(m, beam_width=2, beam_length=2),
                       {"steps": 8000, "batch": 8, "anchors_per_seq": 16, "draft_vocab": True,
                        "chunks": (0, 2, 3, 4, 5, 6, 7, 8)}),
}
# Seeds of the 512-sequence self-distillation chunks the drafters train on: Medusa's heads overfit
# one chunk (top-1 of head 1: 0.64 on training sequences, 0.42 held out), so all train on four
# (redrafter-fr8k on eight).
CHUNKS = (0, 2, 3, 4)
SIZES = {  # the configurations swept: tree sizes (Medusa, hidden transfer), beams, draft lengths
    "medusa": [2, 4, 8, 16, 32, 48, 64],  # 64: the size of the reference's default Medusa tree (63 nodes)
    "hidden_transfer": [2, 4, 8, 16, 32],
    "hidden_transfer main": [4, 8, 16, 32],
    "redrafter": [(1, 2), (1, 4), (2, 4), (4, 4), (8, 4), (4, 2), (8, 2), (16, 2), (8, 3), (16, 3)],
    "medusa fr8k": [2, 4, 5, 8, 11, 16, 32],
    "redrafter fr8k": [(1, 2), (1, 4), (4, 2), (2, 2), (2, 3), (3, 2), (3, 3)],
    "redrafter fr8k int8": [(1, 4), (2, 2), (3, 2), (4, 2)],  # the same drafter, quantized (Drafter.quantize)
    "redrafter-fr8k": [(1, 2), (2, 2), (3, 2), (4, 2)],  # trained for fr8k and two steps (TRAIN)
    "redrafter-fr8k int8": [(2, 2), (3, 2), (4, 2)],
    "draft shortgpt-15": [1, 2, 3, 4],
    "draft shortgpt-20": [1, 2, 3, 4],
}


METHODS = ("medusa", "redrafter", "hidden_transfer", "draft")


def family(name: str) -> str:
    """The method a swept name belongs to ("medusa fr8k" -> "medusa", "draft shortgpt-15" -> "draft",
    "redrafter-fr8k int8" -> "redrafter")."""
    return name.split()[0].split("-")[0]


def trained(name: str) -> str:
    """The trained drafter (a TRAIN key) a swept name uses ("redrafter-fr8k int8" -> "redrafter-fr8k")."""
    return name.split()[0]


DRAFT_VOCAB = 8192  # "fr8k": drafting from the 8192 most frequent tokens of the training data (FR-Spec)


def _drafter(name: str, model, cfg, drafts: dict):
    """The drafter a swept name describes: its family's trained drafter, "fr8k" drafting from the
    frequent-token vocabulary, "int8" with its linears and that vocabulary's head as int8 codes
    (``Drafter.quantize``), "main" (hidden transfer) with pseudo positions under the first-ranked chain."""
    if name.startswith("draft "):
        return D.DraftModel(drafts[name[6:]], n_draft=cfg)
    kind, *options = name.split()
    d = D.load_drafter(RESULTS / "drafters" / kind)
    if "fr8k" in options:
        d.set_draft_vocab(drafts["vocab"])
    if "int8" in options:
        d.quantize(8, 64)
    if "main" in options:
        d.pseudo_on = "main"
    if family(kind) == "redrafter":
        d.beam_width, d.beam_length = cfg
    else:
        d.set_tree(cfg)
    return d


def stage_data(res, model, tok, save) -> tuple[dict[int, D.SelfDistillData], D.SelfDistillData]:
    """The self-distillation chunks every drafter trains on (by seed; each cached), and the
    validation sequences."""
    cache = RESULTS / "cache"
    seeds = sorted({*CHUNKS, *(s for _, opts in TRAIN.values() for s in opts.get("chunks", ()))})
    chunks = {}
    for seed in seeds:
        t0 = time.perf_counter()
        chunks[seed] = D.self_distill_data(model, tok, n=512, prompt_len=32, new_tokens=96, seed=seed, batch=32,
                                           cache_dir=cache)
        if seed == 0 and "data" not in res:
            res["data"] = {"train": list(chunks[0].tokens.shape), "prompt_len": 32,
                           "corpus": "shakespeare (train split)", "seconds": time.perf_counter() - t0}
    val = D.self_distill_data(model, tok, n=16, prompt_len=32, new_tokens=96, seed=1, cache_dir=cache)
    res["data"]["validation"] = list(val.tokens.shape)
    save()
    return chunks, val


def training_data(chunks: dict[int, D.SelfDistillData], seeds=CHUNKS) -> D.SelfDistillData:
    parts = [chunks[s] for s in seeds]
    return D.SelfDistillData(torch.cat([p.tokens for p in parts]), parts[0].prompt_len)


def stage_train(res, model, chunks, val, save, methods=METHODS) -> None:
    rows = res.setdefault("train", {})
    for name, (make, opts) in TRAIN.items():
        if family(name) not in methods:
            continue
        folder = RESULTS / "drafters" / name
        if name in rows and (folder / "drafter.json").exists():
            continue
        drafter = make(model)
        opts = dict(opts)
        train = training_data(chunks, opts.pop("chunks", CHUNKS))
        if opts.get("draft_vocab"):  # the fr8k rows' vocabulary
            drafter.set_draft_vocab(D.frequent_tokens(chunks[0].tokens, DRAFT_VOCAB, model.config.vocab_size))
        rep = D.train_drafter(drafter, model, train, lr=1e-3, checkpoint_dir=RESULTS / "checkpoints" / name, **opts)
        row = {**opts, "sequences": len(train.tokens), "loss_first": sum(rep.history[:20]) / 20,
               "loss_last": sum(rep.history[-20:]) / 20,
               "seconds": rep.seconds, "resumed_at": rep.resumed_at,
               "parameters": sum(p.numel() for p in drafter.parameters())}
        if family(name) != "redrafter":
            acc = D.measure_accuracy(drafter, model, val)
            row["top1_accuracy"] = acc[:, 0].tolist()
            row["top8_accuracy"] = acc.sum(1).tolist()
        row["weights_sha256"] = hashlib.sha256(b"".join(
            v.detach().cpu().contiguous().numpy().tobytes() for v in drafter.state_dict().values())).hexdigest()[:16]
        drafter.save(folder)
        if not _same_drafter(rows.get(name), row):  # training is deterministic: a rerun gives the same drafter
            _retire_sweep(res, name)
        rows[name] = row
        log.info("%s trained: %s", name, row)
        save()


SAME = ("steps", "batch", "anchors_per_seq", "sequences", "loss_first", "loss_last", "top1_accuracy",
        "top8_accuracy", "weights_sha256")


def _same_drafter(old: dict | None, new: dict) -> bool:
    """Whether a retraining reproduced the drafter of ``old`` exactly: the same options and loss
    history means (full precision), accuracies and, where both have it, the same weights hash."""
    return old is not None and all(old.get(k) == new.get(k) for k in SAME if k in old and k in new) \
        and all(k in old for k in ("loss_first", "loss_last"))


def _retire_sweep(res: dict, name: str) -> None:
    """Drafter ``name`` was (re)trained: its sweep rows are redone; those the timing table used
    move to ``sweep_timed`` (the timing stays that of the earlier drafter until re-timed)."""
    timed = res.get("timing", {}).get("rows", {})
    for key in [k for k, r in res.get("sweep", {}).items() if trained(r["method"]) == name]:
        row = res["sweep"].pop(key)
        if key in timed:
            res.setdefault("sweep_timed", {}).setdefault(key, row)


def make_drafts(model, tok) -> dict:
    calib = calibration(tok, "shakespeare", n_samples=16, seq_len=512, seed=0)
    return {f"shortgpt-{n}": ShortGPT(n_remove=n, n_samples=16)(copy.deepcopy(model), calib).eval()
            for n in (15, 20)}


def stage_sweep(res, model, prompts, drafts, plain, save, methods=METHODS) -> None:
    rows = res.setdefault("sweep", {})
    for name, cfgs in SIZES.items():
        if family(name) not in methods:
            continue
        for cfg in cfgs:
            key = f"{name} {cfg}"
            if key in rows:
                continue
            d = _drafter(name, model, cfg, drafts)
            t0 = time.perf_counter()
            D.generate(model, None, prompts[:1], 8, drafter=d)  # warm-up
            tokens, cands, positions, seqs, secs = [], [], [], [], 0.0
            for p in prompts:
                out = D.generate(model, None, [p], NEW, drafter=d)
                secs += out.stats.seconds
                tokens += out.stats.tokens_per_step
                cands += out.stats.candidates_per_step
                positions += out.stats.positions_per_step
                seqs.append(out.sequences[0])
            rows[key] = {"method": name, "config": cfg, "tokens_per_step": sum(tokens) / len(tokens),
                         "tree": sum(cands) / len(cands), "positions": sum(positions) / len(positions),
                         "identical_to_greedy": seqs == plain,
                         "seconds": time.perf_counter() - t0, "generate_seconds": secs}
            log.info("%s: %.3f tokens/step, tree %.1f", key, rows[key]["tokens_per_step"], rows[key]["tree"])
            save()


def _best(res, methods=METHODS) -> dict[str, str]:
    """Per method, the swept configuration with the highest tokens per second of the sweep."""
    best: dict[str, tuple[float, str]] = {}
    for key, r in res["sweep"].items():
        if family(r["method"]) not in methods:
            continue
        rate = NEW * 8 / r["generate_seconds"]
        if r["method"] not in best or rate > best[r["method"]][0]:
            best[r["method"]] = (rate, key)
    return {m: k for m, (_, k) in best.items()}


def rotations(keys: list[str], n: int, start: int = 0) -> list[list[str]]:
    """The order the decoders run in for ``n`` consecutive prompt groups: ``keys`` rotated by one
    more place for every group (from ``start``), so each decoder runs first, second, ... equally
    often over ``len(keys)`` groups."""
    return [keys[(start + i) % len(keys):] + keys[: (start + i) % len(keys)] for i in range(n)]


BLAS = ", BLAS linears"  # a timing row decoded with row_kernel=False (the model's linears through F.linear)


def stage_timing(res, model, prompts, drafts, repeats: int, save, methods=METHODS) -> None:
    best = _best(res, methods)
    fastest = max(best.values(), key=lambda k: NEW * 8 / res["sweep"][k]["generate_seconds"])
    runs = {"hf generate": None, "plain": None, "plain" + BLAS: None, **{k: res["sweep"][k] for k in best.values()},
            fastest + BLAS: res["sweep"][fastest]}
    times: dict[str, dict[str, list[float]]] = {k: {"1": [], "4": []} for k in runs}

    # each drafter loaded once, outside the timed loops (its per-generation state is reset by begin())
    drafters = {k: None if r is None else _drafter(r["method"], model, r["config"], drafts) for k, r in runs.items()}

    def once(key, group) -> float:
        t0 = time.perf_counter()
        if key == "hf generate":
            model.generate(torch.tensor(group), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
        else:
            D.generate(model, None, group, NEW, drafter=drafters[key], row_kernel=not key.endswith(BLAS))
        return time.perf_counter() - t0

    keys = list(runs)
    for key in keys:  # warm-up
        once(key, prompts[:4])
    # Interleaved per prompt group: each prompt (batch 1) or batch of 4 is decoded by every decoder in
    # turn, the order rotated from group to group and repeat to repeat, so that the machine's drift
    # (plain decoding alone moved 19-28 tok/s within one run) reaches every decoder alike rather than
    # whichever ran in a slow minute. A decoder's rate in a repeat: all its tokens over all its seconds.
    turn = 0
    for _ in range(repeats):
        for batch in ("1", "4"):
            groups = [prompts[i : i + int(batch)] for i in range(0, len(prompts), int(batch))]
            secs = dict.fromkeys(keys, 0.0)
            for g, order in zip(groups, rotations(keys, len(groups), turn)):
                for key in order:
                    secs[key] += once(key, g)
            turn += len(groups)
            for key in keys:
                times[key][batch].append(len(prompts) * NEW / secs[key])
    out = {}
    for key, t in times.items():
        out[key] = {f"tok_s_b{b}": statistics.median(v) for b, v in t.items()}
        out[key].update({f"all_b{b}": v for b, v in t.items()})
    _replace_timing(res, {"repeats": repeats, "interleave": "group", "rows": out, "methods": list(methods), "date": time.strftime("%Y-%m-%d"),
                          "trained_steps": {n: r["steps"] for n, r in res.get("train", {}).items()}})
    save()


def _replace_timing(res: dict, new: dict) -> None:
    """Make ``new`` the timing table. The one it replaces is kept: under ``timing_earlier`` when it
    timed methods this run did not (their last timing), else appended to ``timing_history`` (the
    same methods timed again: how much a ratio moves between runs on one machine)."""
    old, methods = res.get("timing"), set(new["methods"])
    if old and not set(old.get("methods", METHODS)) <= methods:  # keep the last timing of the others
        res["timing_earlier"] = {**old, "sweep_timed": res.get("sweep_timed", {})}
    else:
        if old:
            res.setdefault("timing_history", []).append(old)
        if methods >= set(res.get("timing_earlier", {}).get("methods", ())):
            res.pop("timing_earlier", None)
    res.pop("sweep_timed", None)  # every timed row is now of the current drafters
    res["timing"] = new


def _sweep_line(r: dict) -> str:
    cfg = r["config"]
    cfg = f"{cfg[0]} beams x {cfg[1]}" if isinstance(cfg, (list, tuple)) else cfg
    return (f"| {r['method']} | {cfg} | {r['tree']:.1f} | {r.get('positions', 0):.1f} | {r['tokens_per_step']:.3f} | "
            f"{'yes' if r['identical_to_greedy'] else 'NO'} |")


def _timing_section(res: dict, timing: dict, title: str) -> list[str]:
    rows = timing["rows"]
    base = {b: max(r[f"tok_s_b{b}"] for k, r in rows.items() if k.startswith(("hf generate", "plain")))
            for b in ("1", "4")}
    out = [f"## {title} (medians of {timing['repeats']} interleaved repeats)", "",
           "Speed-up against the faster of the two plain decoders in the same run"
           + (" (every decoder decodes each prompt, or batch of 4, in turn before the next; the order rotates)"
              if timing.get("interleave") == "group" else " (each decoder decoded all prompts in turn)")
           + ". This engine computes the "
           f"model's linears for up to {MAX_ROWS} token rows with `llmdeploy.kernels.rows` (each weight read once, "
           "the next block of weights prefetched while one computes); "
           "rows ending in \"BLAS linears\" decode with `row_kernel=False` (`F.linear`) instead."
           + ("" if set(timing.get("methods", METHODS)) == set(METHODS) else
              f" Timed on {timing['date']}: {', '.join(timing['methods'])} only (`--methods`).")
           + " Drafters' training steps then: " + ", ".join(f"{n} {s}" for n, s in timing.get("trained_steps", {}).items())
           + "."
           + "".join(f" The {n} rows were timed with its {s}-step training; the sweep's {n} rows are of its "
                     f"{res['train'][n]['steps']}-step retraining."
                     for n, s in timing.get("trained_steps", {}).items()
                     if n in res.get("train", {}) and res["train"][n]["steps"] != s),
           "", "| decoder | tok/s batch 1 | speed-up | tok/s batch 4 | speed-up |", "|---|---|---|---|---|"]
    for key, r in rows.items():
        out.append(f"| {key} | {r['tok_s_b1']:.1f} | {r['tok_s_b1'] / base['1']:.2f}x | {r['tok_s_b4']:.1f} | "
                   f"{r['tok_s_b4'] / base['4']:.2f}x |")
    out.append("")
    return out


def markdown(res: dict) -> str:
    out = ["# Faster decoding on smollm2-135m (2 CPU threads, fp32, greedy)", "",
           f"Held-out prompts: 8 windows of 32 tokens of the Shakespeare test split, {NEW} new tokens; drafters "
           "trained on the model's own continuations of Shakespeare train-split prompts. Tokens/step = accepted "
           "drafts + 1 per verification forward (plain decoding: 1.0). Generated by `python -m benchmarks.decode`.", ""]
    if "train" in res:
        out += ["## Training", "", "Top-1 accuracy on the validation sequences (held out from training).", "",
                "| drafter | parameters | training sequences | steps × batch | loss first → last (means of 20 steps) | "
                "top-1 accuracy per future position | seconds |", "|---|---|---|---|---|---|---|"]
        for name, r in res["train"].items():
            acc = ", ".join(f"{a:.2f}" for a in r.get("top1_accuracy", [])) or "—"
            vocab = " (over the drafting vocabulary)" if r.get("draft_vocab") else ""
            out.append(f"| {name} | {r['parameters']:,} | {r.get('sequences', 512)} | {r['steps']} × {r.get('batch', '?')} | "
                       f"{r['loss_first']:.3f} → {r['loss_last']:.3f}{vocab} | {acc} | {r['seconds']:.0f} |")
        out += ["", "A loss over the drafting vocabulary (`train_drafter(draft_vocab=True)`: the drafter and the model's "
                "distribution renormalized over its 8192 tokens) is not comparable with a full-vocabulary one.", ""]
    if "sweep" in res:
        out += ["## Accepted length against tree size (batch 1)", "",
                "| method | configuration | candidates verified / step | positions per forward | tokens / step | "
                "output = plain greedy |", "|---|---|---|---|---|---|"]
        out += [_sweep_line(r) for r in res["sweep"].values()]
        out.append("")
    if res.get("sweep_timed"):
        out += ["## Sweep rows of the timed drafters retrained since", "",
                "The timing below ran with these drafters (their training then: "
                + ", ".join(f"{n} {s} steps" for n, s in res["timing"].get("trained_steps", {}).items()) + ").", "",
                "| method | configuration | candidates verified / step | positions per forward | tokens / step | "
                "output = plain greedy |", "|---|---|---|---|---|---|"]
        out += [_sweep_line(r) for r in res["sweep_timed"].values()]
        out.append("")
    if "timing" in res:
        out += _timing_section(res, res["timing"], "Wall clock")
    for past in reversed(res.get("timing_history", [])):
        out += _timing_section(res, past, f"Wall clock of an earlier run of the same methods, {past['date']}")
    if "timing_earlier" in res:
        early = res["timing_earlier"]
        out += _timing_section(res, early, f"Earlier wall clock, {early['date']}: the last run that timed "
                               + ", ".join(sorted(set(early.get("methods", METHODS)) - set(res["timing"]["methods"]))))
        if early.get("sweep_timed"):
            out += ["Sweep rows of that run's drafters retrained since:", "",
                    "| method | configuration | candidates verified / step | positions per forward | tokens / step | "
                    "output = plain greedy |", "|---|---|---|---|---|---|"]
            out += [_sweep_line(r) for r in early["sweep_timed"].values()]
            out.append("")
    return "\n".join(out)


def readme_paragraph(res: dict) -> str:
    """The README's sentence on this benchmark, built from ``decode.json`` (tests check the README
    quotes it)."""
    rows = res["timing"]["rows"]
    sweep = {**res["sweep"], **res.get("sweep_timed", {})}  # a timed drafter's own sweep rows
    parts = []
    for key, t in rows.items():
        if key.startswith(("plain", "hf generate")) or key.endswith(BLAS):
            continue
        method, r = sweep[key]["method"], sweep[key]
        cfg = r["config"]
        cfg = f"{cfg[0]} beams x {cfg[1]}" if isinstance(cfg, (list, tuple)) else f"{cfg}"
        parts.append(f"{method} ({cfg}): {r['tokens_per_step']:.2f} tokens per step with "
                     f"{r['tree']:.1f} candidates, {t['tok_s_b1']:.1f} / {t['tok_s_b4']:.1f} tok/s")
    plain = rows["plain"]
    hf = rows["hf generate"]
    return ("Faster decoding on `smollm2-135m` (2 threads, greedy, 8 held-out Shakespeare prompts, "
            f"{res['meta']['new_tokens']} new tokens; tok/s at batch 1 / batch 4, medians of "
            f"{res['timing']['repeats']} "
            + ("repeats interleaved per prompt" if res["timing"].get("interleave") == "group" else "interleaved repeats")
            + f"): plain decoding {plain['tok_s_b1']:.1f} / "
            f"{plain['tok_s_b4']:.1f} tok/s (transformers' generate {hf['tok_s_b1']:.1f} / {hf['tok_s_b4']:.1f}); "
            + "; ".join(parts) + ". Every output equals plain greedy decoding "
            "([benchmarks/results/decode/DECODE.md](benchmarks/results/decode/DECODE.md), `python -m benchmarks.decode`).")


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    methods: dict[str, list[tuple[float, float]]] = {}
    for r in res.get("sweep", {}).values():
        methods.setdefault(r["method"], []).append((r["tree"], r["tokens_per_step"]))
    for m, pts in methods.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set(xlabel="candidates verified per step", ylabel="tokens per verification step", xscale="log",
           title="smollm2-135m, held-out Shakespeare prompts, greedy")
    ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", nargs="+", default=["data", "train", "sweep", "timing"],
                   choices=["data", "train", "sweep", "timing"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="train, sweep and time only these (rows of the others in decode.json are kept; the "
                        "timing table is replaced by this run's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "decode.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    res["meta"] = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "new_tokens": NEW}

    def save() -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(path)
        (RESULTS / "DECODE.md").write_text(markdown(res))

    model, tok = llmdeploy.load(MODEL)
    model.eval()
    chunks, val = stage_data(res, model, tok, save)
    if "train" in args.stage:
        stage_train(res, model, chunks, val, save, args.methods)
    prompts = test_windows(tok, "shakespeare", 32, 8).tolist()
    drafts = make_drafts(model, tok) if {"sweep", "timing"} & set(args.stage) and "draft" in args.methods else {}
    drafts["vocab"] = D.frequent_tokens(chunks[0].tokens, DRAFT_VOCAB, model.config.vocab_size)
    plain = D.generate(model, None, prompts, NEW).sequences
    if "sweep" in args.stage:
        stage_sweep(res, model, prompts, drafts, plain, save, args.methods)
    if "timing" in args.stage:
        stage_timing(res, model, prompts, drafts, args.repeats, save, args.methods)
    save()
    plot(res, RESULTS / "decode.png")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
