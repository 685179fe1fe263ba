"""What the AQLM paper-settings recipes cost: measured on block 0 of SmolLM2-135M, extrapolated
to the whole run.

    python -m benchmarks.aqlm_paper_time [--recipe aqlm-2x8-paper] [--max-rounds 40]

Measured here (one run, this machine, fp32): (1) the per-layer search of every linear of block 0
with the recipe's settings (k-means, rounds of Adam steps + beam search until a round improves
by less than the tolerance; capped at ``--max-rounds``, and a capped layer is reported as a lower
bound), on a Hessian from 8 calibration windows of the recipe's length; (2) one forward and one
forward + backward of block 0 on one window of the recipe's length. Extrapolated: 30 blocks
alike; per block three forward passes over the recipe's calibration windows (statistics, dense
targets, propagation), fine-tuning epochs × windows forward + backward plus one evaluation pass
per epoch. Writes ``benchmarks/results/aqlm_paper/<recipe>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

import llmdeploy
from llmdeploy.compress.engine import StopForward, run_blockwise, to_device
from llmdeploy.data import calibration
from llmdeploy.quant.aqlm import _finite_hessian, quantize_layer

OUT = Path(__file__).resolve().parent / "results" / "aqlm_paper"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="aqlm-2x8-paper")
    p.add_argument("--max-rounds", type=int, default=40)
    p.add_argument("--windows", type=int, default=8, help="calibration windows for the Hessians")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    compose, settings = llmdeploy.recipe.load_with_settings(args.recipe)
    (cfg,) = compose.steps
    seq_len, n_samples = settings["seq_len"], settings["n_samples"]
    model, tok = llmdeploy.load("smollm2-135m")
    n_blocks = model.config.num_hidden_layers
    calib = calibration(tok, "shakespeare", n_samples=args.windows, seq_len=seq_len, seed=0)
    capped = copy.deepcopy(cfg)
    capped.max_iter = min(cfg.max_iter, args.max_rounds)
    layers: dict[str, dict] = {}
    timing: dict[str, float] = {}

    def process(ctx) -> None:
        stats = ctx.collect_stats()
        for li, (path, lin) in enumerate(ctx.linears().items()):
            h = _finite_hessian(stats[path].xtx / max(stats[path].n_rows, 1))
            t0 = time.perf_counter()
            res = quantize_layer(lin.weight.detach(), h, capped, torch.Generator().manual_seed(li))
            seconds = time.perf_counter() - t0
            rounds = len(res.errors) - 1
            layers[path] = {"shape": list(lin.weight.shape), "seconds": seconds, "rounds": rounds,
                            "converged": rounds < capped.max_iter, "relative_error": res.error}
            logging.info("%s: %d rounds in %.1f s (converged: %s), relative error %.4f", path, rounds, seconds,
                         rounds < capped.max_iter, res.error)
        x, kw = ctx.inputs[0][:1].to(ctx.device), to_device(ctx.kwargs[0], ctx.device)
        kw = {k: (v[:1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] > 1 else v) for k, v in kw.items()}
        with torch.no_grad():
            ctx.block(x, **kw)
            t0 = time.perf_counter()
            for _ in range(3):
                ctx.block(x, **kw)
            timing["forward_s"] = (time.perf_counter() - t0) / 3
        params = [p for p in ctx.block.parameters() if p.is_floating_point()]
        for q in params:
            q.requires_grad_(True)
        t0 = time.perf_counter()
        for _ in range(3):
            out = ctx.adapter.block_output(ctx.block(x, **kw))
            out.float().square().mean().backward()
        timing["forward_backward_s"] = (time.perf_counter() - t0) / 3
        raise StopForward

    try:
        run_blockwise(model, calib, process, batch_size=1)
    except StopForward:
        pass
    search_block = sum(v["seconds"] for v in layers.values())
    passes = 3 * n_samples * timing["forward_s"]
    finetune = cfg.finetune_epochs * n_samples * (timing["forward_backward_s"] + timing["forward_s"])
    total = n_blocks * (search_block + passes + finetune)
    act_gib = 2 * n_samples * seq_len * model.config.hidden_size * 4 / 2**30
    result = {
        "recipe": args.recipe, "model": "smollm2-135m", "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "max_rounds_measured": capped.max_iter,
        "hessian_windows": args.windows, "seq_len": seq_len, "n_samples": n_samples, "block0_layers": layers,
        "block0_search_seconds": search_block, **timing,
        "per_block_seconds": {"search": search_block, "calibration_passes": passes, "finetune_max": finetune},
        "total_hours_estimate": total / 3600,
        "search_is_lower_bound": not all(v["converged"] for v in layers.values()),
        "activation_memory_gib": act_gib,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.recipe}.json").write_text(json.dumps(result, indent=2))
    rows = "\n".join(f"| {k} | {tuple(v['shape'])} | {v['rounds']}{'' if v['converged'] else '+ (capped)'} | "
                     f"{v['seconds']:.1f} | {v['relative_error']:.4f} |" for k, v in layers.items())
    md = (f"# {args.recipe} on SmolLM2-135M: measured block 0, extrapolated\n\n"
          f"{result['date']}, {result['threads']} CPU threads, fp32; Hessians from {args.windows} windows of "
          f"{seq_len} tokens. `python -m benchmarks.aqlm_paper_time --recipe {args.recipe}` regenerates this file.\n\n"
          "| linear | shape | rounds | seconds | relative error |\n|---|---|---|---|---|\n" + rows + "\n\n"
          f"- per-layer search, block 0: {search_block:.0f} s"
          + (" (a lower bound: some layers hit the round cap)" if result["search_is_lower_bound"] else "") + "\n"
          f"- block forward on one {seq_len}-token window: {timing['forward_s']:.2f} s; forward + backward: "
          f"{timing['forward_backward_s']:.2f} s\n"
          f"- per block: search {search_block / 60:.1f} min, 3 passes over {n_samples} windows "
          f"{passes / 60:.1f} min, fine-tuning (at most {cfg.finetune_epochs} epochs) {finetune / 60:.1f} min\n"
          f"- **whole model ({n_blocks} blocks): about {total / 3600:.1f} hours** on this machine"
          + (" or more" if result["search_is_lower_bound"] else "") + "\n"
          f"- block inputs and dense targets of {n_samples} × {seq_len} tokens take {act_gib:.1f} GiB in fp32\n")
    (OUT / f"{args.recipe}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
