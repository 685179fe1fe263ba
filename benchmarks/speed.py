"""Speed of compressed models against the dense model they replace, on this machine's CPU.

    python -m benchmarks.speed                 # layers and smollm2-135m, writes results/speed/
    python -m benchmarks.speed --rounds 7 --skip-model

Four measurements, every ratio against dense in the same run, rounds interleaved (dense, then each
format, then dense again…) so that machine noise hits every row alike; medians reported:

- **memory bandwidth**: ``sum()`` over a 1 GiB fp32 tensor, the ceiling for memory-bound decoding;
- **layers**, batch 1 (one token): ``F.linear`` on the fp32 weight against each quantized layer's
  forward, at Llama-2-7B's MLP shape (11008 x 4096) and smollm2's (1536 x 576); achieved GB/s =
  bytes of the stored weight / time;
- **model**: batch-1 greedy decode tokens/s (median step of ``--new-tokens`` steps after a 64-token
  prompt) and prefill of 512 tokens, for ``smollm2-135m`` dense and compressed (AQLM layers with
  seeded random codes: the kernels' speed does not depend on the values); the "floor" row
  replaces every decoder linear by a stub returning zeros — the time per token spent outside them
  (norms, attention, the head, PyTorch's eager dispatch), which no linear kernel can remove.
  With ``--compile``, each model's decode step is also measured as one ``torch.compile`` graph over
  a static KV cache (compressed modules are opaque operators in it: ``llmdeploy.kernels.opaque``),
  in the same rounds; those ratios are against the compiled dense model;
- **few rows** (``--part rows``): ``F.linear`` against the row kernel
  (:func:`llmdeploy.kernels.rows.linear_rows`) for 1..64 token rows at smollm2's shapes — the cost
  of verifying a tree of drafted tokens (BLAS's GEMM path for a few rows costs a multiple of one).

Parts not measured in a run keep their earlier results in ``speed.json``.

Writes ``results/speed/speed.json``, ``SPEED.md`` and ``speed.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "speed"
log = logging.getLogger("benchmarks.speed")

LAYER_SHAPES = {"llama2-7b mlp 11008x4096": (11008, 4096), "smollm2 mlp 1536x576": (1536, 576)}


def _median_time(fn: Callable[[], object], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def bandwidth(rounds: int) -> float:
    """GB/s of a streaming read (``sum`` of 1 GiB of fp32), median of ``rounds``."""
    a = torch.ones(2**28)
    a.sum()
    return statistics.median(a.numel() * 4 / _median_time(a.sum, 3) / 1e9 for _ in range(rounds))


def _pruned(lin: torch.nn.Linear, sparsity: float = 0.0, n: int = 0, m: int = 0) -> torch.nn.Module:
    """``lin`` magnitude-pruned (unstructured ``sparsity`` or N:M), stored as a SparseLinear."""
    from llmdeploy.prune import SparseLinear
    from llmdeploy.prune.masks import SparsityPattern, select_mask

    pattern = SparsityPattern(sparsity=n / m if m else sparsity, n=n, m=m)
    pruned = torch.nn.Linear(lin.in_features, lin.out_features, bias=False)
    pruned.weight.data = lin.weight.data.masked_fill(select_mask(lin.weight.data.abs(), pattern), 0)
    return SparseLinear.from_linear(pruned, n=n, m=m)


def _aqlm(lin: torch.nn.Linear, num_codebooks: int, nbits: int, seed: int = 0) -> torch.nn.Module:
    """An AQLM layer of ``lin``'s shape with seeded random codes, codebooks and scales: the kernels'
    speed does not depend on the values."""
    from llmdeploy.quant.aqlm_linear import AQLMLinear, pack_codes

    g = torch.Generator().manual_seed(seed)
    m = AQLMLinear(lin.in_features, lin.out_features, num_codebooks, nbits, 8, bias=lin.bias is not None)
    with torch.no_grad():
        m.codebooks.copy_(torch.randn(m.codebooks.shape, generator=g) * 0.05)
        m.scales.copy_(torch.rand(m.scales.shape, generator=g) + 0.5)
        m.codes.copy_(pack_codes(torch.randint(0, 2**nbits, m.codes.shape, generator=g), nbits))
        if lin.bias is not None:
            m.bias.copy_(lin.bias)
    return m


def aqlm_random(model, num_codebooks: int, nbits: int):
    """Every decoder linear of ``model`` replaced by a random-coded AQLM layer (speed only: see :func:`_aqlm`)."""
    from llmdeploy.models.adapters import get_adapter
    for i, name in enumerate(get_adapter(model).linear_names()):
        model.set_submodule(name, _aqlm(model.get_submodule(name), num_codebooks, nbits, seed=i))
    return model


def layer_formats() -> dict[str, Callable[[torch.nn.Linear], torch.nn.Module]]:
    from llmdeploy.quant import RTNLinear
    from llmdeploy.quant.dynamic_int8 import DynamicInt8Linear

    return {
        "rtn int4 g64": lambda lin: RTNLinear.from_linear(lin, 4, 64, False),
        "rtn int3 g64": lambda lin: RTNLinear.from_linear(lin, 3, 64, False),
        "rtn int8 g64": lambda lin: RTNLinear.from_linear(lin, 8, 64, False),
        "rtn int2 g64": lambda lin: RTNLinear.from_linear(lin, 2, 64, False),
        "w8a8 dynamic": DynamicInt8Linear.from_linear,
        "sparse 50%": lambda lin: _pruned(lin, 0.5),
        "sparse 70%": lambda lin: _pruned(lin, 0.7),
        "sparse 2:4": lambda lin: _pruned(lin, n=2, m=4),
        "aqlm 2x8 g8": lambda lin: _aqlm(lin, 2, 8),
        "aqlm 1x16 g8": lambda lin: _aqlm(lin, 1, 16),
    }


def stored_bytes(mod: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(mod.buffers()) + list(mod.parameters()))


@torch.no_grad()
def layers(rounds: int) -> dict:
    out = {}
    for label, (o, i) in LAYER_SHAPES.items():
        lin = torch.nn.Linear(i, o, bias=False)
        mods = {"dense fp32": lin, **{k: f(lin) for k, f in layer_formats().items()}}
        x = torch.randn(1, i)
        inner = 20 if o * i > 10**7 else 200
        for m in mods.values():  # warm-up, and the kernels' one-time repacking
            m(x)
        times: dict[str, list[float]] = {k: [] for k in mods}
        for _ in range(rounds):
            for k, m in mods.items():
                times[k].append(_median_time(lambda m=m, x=x: m(x), inner))
        med = {k: statistics.median(v) for k, v in times.items()}
        out[label] = {k: {"ms": 1e3 * med[k], "x_dense": med["dense fp32"] / med[k],
                          "weight_bytes": stored_bytes(m), "gb_s": stored_bytes(m) / med[k] / 1e9}
                      for k, m in mods.items()}
        log.info("%s: %s", label, {k: round(v["x_dense"], 2) for k, v in out[label].items()})
    return out


class _Zero(torch.nn.Module):
    """A linear's stand-in returning zeros: what decoding costs without the decoder linears."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def without_linears(model):
    from llmdeploy.models.adapters import get_adapter
    for name in get_adapter(model).linear_names():
        model.set_submodule(name, _Zero(model.get_submodule(name).out_features))
    return model


FLOOR = "floor: decoder linears removed"


def model_formats() -> dict[str, Callable]:
    from llmdeploy.prune import Magnitude
    from llmdeploy.quant import RTN, DynamicInt8, EmbeddingRTN

    def emb8(m):  # the optional int8 embedding + tied head (EmbeddingRTN), on top of a format
        return EmbeddingRTN(bits=8, group_size=64)(m, None)

    return {
        FLOOR: without_linears,
        "rtn int4 g64": lambda m: RTN(bits=4, group_size=64)(m, None),
        "rtn int3 g64": lambda m: RTN(bits=3, group_size=64)(m, None),
        "rtn int8 g64": lambda m: RTN(bits=8, group_size=64)(m, None),
        "w8a8 dynamic": lambda m: DynamicInt8()(m, None),
        "rtn int4 g64 + int8 embedding/head": lambda m: emb8(RTN(bits=4, group_size=64)(m, None)),
        "rtn int8 g64 + int8 embedding/head": lambda m: emb8(RTN(bits=8, group_size=64)(m, None)),
        "w8a8 dynamic + int8 embedding/head": lambda m: emb8(DynamicInt8()(m, None)),
        # magnitude pruning: the same storage and kernels as SparseGPT/Wanda/SparseLLM of that pattern
        "sparse 50%": lambda m: Magnitude(sparsity=0.5)(m, None),
        "sparse 70%": lambda m: Magnitude(sparsity=0.7)(m, None),
        "sparse 2:4": lambda m: Magnitude(pattern="2:4")(m, None),
        "aqlm 2x8 g8 (random codes)": lambda m: aqlm_random(m, 2, 8),
        "aqlm 1x16 g8 (random codes)": lambda m: aqlm_random(m, 1, 16),
        "aqlm 2x8 g8 (random codes) + int8 embedding/head": lambda m: emb8(aqlm_random(m, 2, 8)),
        "aqlm 1x16 g8 (random codes) + int8 embedding/head": lambda m: emb8(aqlm_random(m, 1, 16)),
    }


@torch.no_grad()
def model(rounds: int, new_tokens: int, only: list[str] | None, compiled: bool = False) -> dict:
    import llmdeploy
    from llmdeploy.eval.speed import _decode, _decode_compiled, _prefill

    base, _ = llmdeploy.load("smollm2-135m")
    models = {"dense fp32": base.eval()}
    for k, f in model_formats().items():
        if only is None or k in only:
            m, _ = llmdeploy.load("smollm2-135m")
            models[k] = f(m.eval()).eval()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, base.config.vocab_size, (1, 64), generator=gen)
    long = torch.randint(0, base.config.vocab_size, (1, 512), generator=gen)
    compile_s: dict[str, float] = {}
    for k, m in models.items():  # warm-up (and repacking; with --compile, the compilation)
        _decode(m, prompt, 2)
        _prefill(m, long[:, :64])
        if compiled:
            t0 = time.perf_counter()
            _decode_compiled(m, prompt, 2)
            compile_s[k] = time.perf_counter() - t0
    dec: dict[str, list[float]] = {k: [] for k in models}
    dec_c: dict[str, list[float]] = {k: [] for k in models}
    pre: dict[str, list[float]] = {k: [] for k in models}
    for r in range(rounds):
        for k, m in models.items():
            dec[k].append(statistics.median(_decode(m, prompt, new_tokens)))
            if compiled:
                dec_c[k].append(statistics.median(_decode_compiled(m, prompt, new_tokens)))
            pre[k].append(_prefill(m, long))
        log.info("model round %d: %s", r, {k: round(1 / v[-1], 1) for k, v in dec.items()})
    d = {k: statistics.median(v) for k, v in dec.items()}
    p = {k: statistics.median(v) for k, v in pre.items()}
    out = {k: {"decode_tok_s": 1 / d[k], "decode_x_dense": d["dense fp32"] / d[k],
               "prefill_512_s": p[k], "prefill_x_dense": p["dense fp32"] / p[k],
               "bytes": stored_bytes(models[k]), **kernel_choices(models[k])} for k in models}
    if compiled:
        c = {k: statistics.median(v) for k, v in dec_c.items()}
        for k in models:
            out[k].update({"compiled_decode_tok_s": 1 / c[k], "compiled_decode_x_dense": c["dense fp32"] / c[k],
                           "compiled_x_eager": d[k] / c[k], "compile_s": compile_s[k]})
    return out


ROW_SHAPES = {"attention 576x576": (576, 576), "mlp up 1536x576": (1536, 576), "mlp down 576x1536": (576, 1536),
              "head 49152x576": (49152, 576)}
ROW_COUNTS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64)


@torch.no_grad()
def few_rows(rounds: int) -> dict:
    """BLAS (``F.linear``) against :func:`llmdeploy.kernels.rows.linear_rows` for 1..64 token rows
    at smollm2-135m's shapes: what verifying a tree of that many nodes costs per linear. Each call
    takes the next of several weights (at least two, about 256 MiB in all), so weights stream from memory as in a
    model's forward rather than sitting in cache."""
    import torch.nn.functional as F

    from llmdeploy.kernels import native
    from llmdeploy.kernels import rows as rows_kernel

    if not rows_kernel.available():
        return {}
    fns = {"blas": F.linear, "rows": rows_kernel.linear_rows}
    if "avx2" in native.available_isas():  # the AVX2 build: 3 rows per pass (native AVX-512: 6)
        def rows_avx2(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            with native.isa("avx2"):
                return rows_kernel.linear_rows(x, w)
        fns["rows_avx2"] = rows_avx2
    out = {}
    for label, (o, i) in ROW_SHAPES.items():
        weights = itertools.cycle([torch.randn(o, i) for _ in range(max(2, 2**26 // (o * i)))])
        inner = max(3, 2**24 // (o * i))
        t: dict[tuple[str, int], list[float]] = {}
        for _ in range(rounds):
            for m in ROW_COUNTS:
                x = torch.randn(m, i)
                for name, fn in fns.items():
                    fn(x, next(weights))
                    t.setdefault((name, m), []).append(
                        _median_time(lambda fn=fn, x=x, w=weights: fn(x, next(w)), inner))
        med = {key: statistics.median(v) for key, v in t.items()}
        out[label] = {str(m): {"blas_ms": 1e3 * med["blas", m], "rows_ms": 1e3 * med["rows", m],
                               "x_blas": med["blas", m] / med["rows", m],
                               "blas_x_one_row": med["blas", m] / med["blas", 1],
                               "rows_x_one_row": med["rows", m] / med["rows", 1],
                               **({"rows_avx2_ms": 1e3 * med["rows_avx2", m]} if "rows_avx2" in fns else {})}
                      for m in ROW_COUNTS}
        log.info("%s: %s", label, {m: round(v["x_blas"], 2) for m, v in out[label].items()})
    return out


def kernel_choices(model) -> dict:
    """How many pruned layers measured the sparse kernel faster than the dense matvec (and kept it)."""
    from llmdeploy.prune import SparseLinear
    picks = [getattr(m, "kernel_choice_", None) for m in model.modules() if isinstance(m, SparseLinear)]
    if not picks:
        return {}
    return {"kernel_choice": {c: picks.count(c) for c in ("sparse", "dense")}}


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Speed on this CPU (`python -m benchmarks.speed`, {m['date']})", "",
             f"{m['threads']} threads; streaming read bandwidth {res['bandwidth_gb_s']:.1f} GB/s (median of "
             f"{m['rounds']}). Medians of {m['rounds']} interleaved rounds; every ratio is against dense fp32 "
             "in the same run.", ""]
    if "layers" in res:
        lines += ["## Layers, batch 1", "", "| shape | format | ms | x dense | weight MiB | GB/s |",
                  "|---|---|---|---|---|---|"]
        for shape, rows in res["layers"].items():
            for k, r in rows.items():
                lines.append(f"| {shape} | {k} | {r['ms']:.3f} | {r['x_dense']:.2f}x | "
                             f"{r['weight_bytes'] / 2**20:.2f} | {r['gb_s']:.1f} |")
        lines.append("")
    if "model" in res:
        lines += ["## smollm2-135m", "", f"Batch-1 greedy decode (median step of {m['new_tokens']} after a "
                  "64-token prompt) and one prefill of 512 tokens.", "",
                  "| format | decode tok/s | x dense | prefill 512 s | x dense | MiB |", "|---|---|---|---|---|---|"]
        for k, r in res["model"].items():
            if k == FLOOR:
                continue
            lines.append(f"| {k} | {r['decode_tok_s']:.1f} | {r['decode_x_dense']:.2f}x | {r['prefill_512_s']:.2f} "
                         f"| {r['prefill_x_dense']:.2f}x | {r['bytes'] / 2**20:.1f} |")
        if any("compiled_decode_tok_s" in r for r in res["model"].values()):
            lines += ["", "The same decode with each step one `torch.compile` graph over a static KV cache "
                      "(`--compile`; compressed modules are opaque operators in it), measured in the same rounds; "
                      "ratios against the compiled dense model:", "",
                      "| format | compiled decode tok/s | x compiled dense | x its eager decode | compile s |",
                      "|---|---|---|---|---|"]
            for k, r in res["model"].items():
                if "compiled_decode_tok_s" in r:
                    lines.append(f"| {k} | {r['compiled_decode_tok_s']:.1f} | {r['compiled_decode_x_dense']:.2f}x | "
                                 f"{r['compiled_x_eager']:.2f}x | {r['compile_s']:.0f} |")
        chosen = {k: r["kernel_choice"] for k, r in res["model"].items() if "kernel_choice" in r}
        if chosen:
            lines += ["", "Pruned layers time the sparse kernel against a dense matvec on their first call and keep "
                      "the faster: " + "; ".join(f"{k}: {c['sparse']} sparse, {c['dense']} dense"
                                                 for k, c in chosen.items()) + "."]
        if FLOOR in res["model"]:
            f, d = res["model"][FLOOR], res["model"]["dense fp32"]
            lines += ["", f"Without any decoder linear (a stub returning zeros) a decode step still takes "
                      f"{1e3 / f['decode_tok_s']:.1f} ms ({f['decode_tok_s']:.1f} tok/s) against "
                      f"{1e3 / d['decode_tok_s']:.1f} ms dense: the most any linear kernel can give here is "
                      f"{f['decode_x_dense']:.2f}x dense."]
        lines.append("")
    if res.get("rows"):
        r0 = res["rows"]
        lines += ["## Few token rows: BLAS against the row kernel", "",
                  f"Measured {r0['date']} ({r0['threads']} threads, medians of {r0['rounds']} interleaved rounds). "
                  "A tree of n drafted tokens is verified with n-row matmuls; `F.linear` (BLAS) against "
                  "`llmdeploy.kernels.rows.linear_rows` (each weight read once, each row summed as if alone), "
                  "every call on the next of several weights (at least two, about 256 MiB) so that they stream from memory.", "",
                  "Column \"AVX2 build\": the same kernel compiled without AVX-512 (16 vector registers: 3 token "
                  "rows per pass over a block of weights, against 6 in the native build), timed in the same rounds.", "",
                  "The engine sends up to `llmdeploy.kernels.rows.MAX_ROWS` rows to the row kernel; "
                  "column \"row kernel / its 1 row\" is what verifying that many tree nodes costs per linear "
                  "against decoding one token.", "",
                  "| shape | rows | BLAS ms | BLAS / its 1 row | row kernel ms | row kernel / its 1 row | x BLAS "
                  "| AVX2 build ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for shape, by_m in r0["shapes"].items():
            for m, r in by_m.items():
                a = f"{r['rows_avx2_ms']:.3f}" if "rows_avx2_ms" in r else "—"
                lines.append(f"| {shape} | {m} | {r['blas_ms']:.3f} | {r['blas_x_one_row']:.2f}x | "
                             f"{r['rows_ms']:.3f} | {r.get('rows_x_one_row', float('nan')):.2f}x | "
                             f"{r['x_blas']:.2f}x | {a} |")
        lines.append("")
    return "\n".join(lines)


def plot(res: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(s, r) for s, r in res.get("layers", {}).items()]
    if "model" in res:
        panels.append(("smollm2-135m decode", {k: {"x_dense": v["decode_x_dense"]} for k, v in res["model"].items()}))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        ax.barh(list(rows), [r["x_dense"] for r in rows.values()])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set(title=title, xlabel="speed vs dense fp32 (same run)")
    fig.tight_layout()
    fig.savefig(RESULTS / "speed.png", dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--part", nargs="+", default=["layers", "model", "rows"], choices=["layers", "model", "rows"],
                   help="what to measure; the other parts of speed.json are kept")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--only", nargs="+", help="model formats to measure (default: all)")
    p.add_argument("--compile", action="store_true", help="also time each model's decode compiled (torch.compile)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.compile:  # one graph per model, all of one forward's code: never fall back to eager silently
        torch._dynamo.config.cache_size_limit = torch._dynamo.config.accumulated_cache_size_limit = 256
        if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
            torch._dynamo.config.fail_on_recompile_limit_hit = True
    RESULTS.mkdir(parents=True, exist_ok=True)
    parts = [q for q in args.part if not (q == "layers" and args.skip_layers) and not (q == "model" and args.skip_model)]
    path = RESULTS / "speed.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    if {"layers", "model"} & set(parts) or "meta" not in res:
        res.update({"meta": {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
                             "rounds": args.rounds, "new_tokens": args.new_tokens},
                    "bandwidth_gb_s": bandwidth(args.rounds)})
    if "layers" in parts:
        res["layers"] = layers(args.rounds)
    if "model" in parts:
        res["model"] = model(args.rounds, args.new_tokens, args.only, compiled=args.compile)
    if "rows" in parts:
        res["rows"] = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "rounds": args.rounds,
                       "shapes": few_rows(args.rounds)}
    (RESULTS / "speed.json").write_text(json.dumps(res, indent=2))
    (RESULTS / "SPEED.md").write_text(markdown(res))
    plot(res)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
