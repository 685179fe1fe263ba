"""BitDelta on SmolLM2-135M: real fine-tunes, their 1-bit deltas, and multi-tenant serving.

    python -m benchmarks.bitdelta --stage finetune     # the fine-tunes (cached, not in git)
    python -m benchmarks.bitdelta --stage finetune --steps 150 --only shakespeare

Stage ``finetune``: full-parameter fine-tunes of ``smollm2-135m`` (``llmdeploy.finetune.FullFinetune``:
AdamW, cosine schedule) on three shipped domains — the Shakespeare train split, the Python
standard library's sources (``pystdlib``, code) and an even mix of both — each saved under
``benchmarks/results/bitdelta/finetunes/<domain>/`` with its training curve; resumable.
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
DOMAINS = ("shakespeare", "pystdlib", "mix")
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["finetune"], required=True)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
