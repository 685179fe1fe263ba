"""``llmdeploy demo``: the embedded model, dense vs RTN 8/4/3-bit vs mixed precision."""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

from ..compress.base import Compressor
from ..eval.footprint import footprint
from ..eval.perplexity import perplexity
from ..models.loading import load
from ..quant import RTN

log = logging.getLogger(__name__)

# SmolLM2-135M's hidden size is 576 = 4.5 x 128, so groups of 128 do not divide it: the demo
# uses groups of 64 (576 = 9 x 64, 1536 = 24 x 64).
DEMO_GROUP = 64
DEMO_CONFIGS: list[tuple[str, Compressor | None]] = [
    ("dense fp32", None),
    ("RTN 8-bit g64", RTN(bits=8, group_size=DEMO_GROUP)),
    ("RTN 4-bit g64", RTN(bits=4, group_size=DEMO_GROUP)),
    ("RTN 3-bit g64", RTN(bits=3, group_size=DEMO_GROUP)),
    ("mixed: 4-bit g64, down_proj 8-bit", RTN(bits=4, group_size=DEMO_GROUP, overrides={"down_proj": 8, "fc2": 8})),
]


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| configuration | bits/param (quantized linears) | bits/param (model) | size (MiB) | perplexity | Δ vs dense |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = rows[0]["ppl"]
    for r in rows:
        lin = "—" if r["linear_bits"] != r["linear_bits"] else f"{r['linear_bits']:.3f}"
        lines.append(
            f"| {r['name']} | {lin} | {r['model_bits']:.3f} | {r['mib']:.1f} | {r['ppl']:.2f} | "
            f"{r['ppl'] - base:+.2f} |"
        )
    return "\n".join(lines)


def run_demo(out_dir: str = "demo_results", model_name: str = "smollm2-135m", seq_len: int = 512,
             max_windows: int | None = 16) -> list[dict]:
    """Compress ``model_name`` with each demo configuration, measure, print and save a table."""
    t0 = time.perf_counter()
    dense, tok = load(model_name)
    rows = []
    for name, compressor in DEMO_CONFIGS:
        log.info("demo: %s", name)
        model = dense if compressor is None else compressor(copy.deepcopy(dense))
        fp = footprint(model)
        r = perplexity(model, tok, corpus="shakespeare", seq_len=seq_len, max_windows=max_windows)
        rows.append(dict(name=name, recipe=None if compressor is None else compressor.to_dict(),
                         linear_bits=fp.compressed_bits_per_param, model_bits=fp.bits_per_param,
                         mib=fp.bytes / 2**20, ppl=r.ppl, n_tokens=r.n_tokens, seconds=r.seconds))
        if model is not dense:
            del model
    table = markdown_table(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"{model_name}, perplexity on the shakespeare test plays, seq_len {seq_len}, "
              f"{rows[0]['n_tokens']} scored tokens ({max_windows} windows); total {time.perf_counter() - t0:.0f}s\n\n")
    (out / "results.md").write_text(header + table + "\n")
    (out / "results.json").write_text(json.dumps(
        {"model": model_name, "seq_len": seq_len, "max_windows": max_windows, "rows": rows}, indent=2))
    print(header + table)
    print(f"\nwritten to {out.resolve()}")
    return rows
