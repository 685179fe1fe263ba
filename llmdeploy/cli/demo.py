"""``llmdeploy demo``: the embedded model, dense vs RTN 8/4/3-bit vs mixed precision."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

from ..compress.base import Compressor
from ..eval.results import EvalResult, evaluate
from ..io.loading import load
from ..quant import RTN
from ..report import build_report

log = logging.getLogger(__name__)

# SmolLM2-135M's hidden size is 576 = 4.5 x 128, so groups of 128 do not divide it: the demo
# uses groups of 64 (576 = 9 x 64, 1536 = 24 x 64).
DEMO_GROUP = 64
DEMO_CONFIGS: list[tuple[str, Compressor | None]] = [
    ("dense fp32", None),
    ("RTN 8-bit g64", RTN(bits=8, group_size=DEMO_GROUP)),
    ("RTN 4-bit g64", RTN(bits=4, group_size=DEMO_GROUP)),
    ("RTN 3-bit g64", RTN(bits=3, group_size=DEMO_GROUP)),
    ("mixed: 4-bit g64, MLP out 8-bit", RTN(bits=4, group_size=DEMO_GROUP, overrides={"role:mlp_out": 8})),
]


def run_demo(out_dir: str = "demo_results", model_name: str = "smollm2-135m", seq_len: int = 512,
             max_windows: int | None = 16) -> list[EvalResult]:
    """Compress ``model_name`` with each demo configuration, evaluate it with the shared harness
    (perplexity and footprint), and write one JSON per configuration plus the report."""
    t0 = time.perf_counter()
    dense, tok = load(model_name)
    out = Path(out_dir)
    results = []
    for name, compressor in DEMO_CONFIGS:
        log.info("demo: %s", name)
        model = dense if compressor is None else compressor(copy.deepcopy(dense))
        r = evaluate(model, tok, name=name, model_name=model_name, ppl="shakespeare",
                     seq_len=seq_len, max_windows=max_windows)
        r.save(out / f"{len(results)}.json")
        results.append(r)
        del model
    tokens = results[0].perplexity["shakespeare"]["n_tokens"]
    md = build_report(out, title=f"llmdeploy demo: {model_name}", preamble=(
        f"Perplexity on the shakespeare test plays, seq_len {seq_len}, {tokens} scored tokens "
        f"({max_windows} windows); total {time.perf_counter() - t0:.0f}s."))
    print(md.read_text().split("![")[0].strip())
    print(f"\nwritten to {out.resolve()}")
    return results
