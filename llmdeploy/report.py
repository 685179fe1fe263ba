"""Reports: a folder of :class:`~llmdeploy.eval.EvalResult` JSON files -> a Markdown table and
plots (PNG): perplexity vs bits per parameter (the quantization papers' Pareto plot) and
zero-shot accuracy vs size."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from .errors import ResultsError
from .eval.results import HEADLINE_METRIC, EvalResult

log = logging.getLogger(__name__)


def load_results(results_dir: str | os.PathLike) -> list[EvalResult]:
    """Every result JSON in ``results_dir``, sorted by bits per parameter (densest last)."""
    results = [EvalResult.load(p) for p in sorted(Path(results_dir).glob("*.json"))]
    return sorted(results, key=lambda r: (-r.footprint.get("bits_per_param", 0), r.name))


def markdown_table(results: list[EvalResult]) -> str:
    """One row per result; a ``measured`` column (each row's run date) when the rows come from runs of
    different days."""
    corpora = sorted({c for r in results for c in r.perplexity})
    tasks = sorted({t for r in results for t in r.zero_shot})
    with_speed = any(r.speed for r in results)
    header = EvalResult.markdown_header(corpora, tasks, with_speed)
    rows = [r.markdown_row(corpora, tasks, with_speed) for r in results]
    days = [str(r.meta.get("date", ""))[:10] or "—" for r in results]
    if len(set(days)) > 1:  # rows of several runs: say which, since speed is only comparable within one run
        head, rule = header.split("\n")
        header = f"{head} measured |\n{rule}---|"
        rows = [f"{row} {day} |" for row, day in zip(rows, days)]
    return "\n".join([header, *rows])


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated in (lower x, lower y), sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _scatter(pts: list[tuple[float, float, str]], path: str | os.PathLike, *, xlabel: str,
             ylabel: str, title: str, front: list[int] | None = None, logy: bool = False) -> Path:
    """A labelled scatter plot saved as PNG (optionally with a dashed Pareto front)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], zorder=3)
    for x, y, name in pts:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if front:
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="gray",
                zorder=2, label="Pareto front")
        ax.legend()
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_pareto(results: list[EvalResult], corpus: str, path: str | os.PathLike,
                bits_key: str = "bits_per_param") -> Path | None:
    """Perplexity vs bits per parameter, log-scale perplexity, Pareto front drawn."""
    pts = [(r.footprint.get(bits_key), r.perplexity[corpus]["ppl"], r.name)
           for r in results if corpus in r.perplexity and r.footprint.get(bits_key) is not None]
    pts = [p for p in pts if not math.isnan(p[0])]
    if not pts:
        return None
    which = "whole model" if bits_key == "bits_per_param" else "compressed linears"
    return _scatter(pts, path, xlabel=f"bits per parameter ({which})",
                    ylabel=f"perplexity ({corpus}, log scale)", title="Perplexity vs size",
                    front=pareto_front([(p[0], p[1]) for p in pts]), logy=True)


def plot_accuracy(results: list[EvalResult], path: str | os.PathLike) -> Path | None:
    """Mean zero-shot headline accuracy vs size in MiB."""
    pts = []
    for r in results:
        scores = [r.task_score(t) for t in r.zero_shot]
        scores = [s for s in scores if not math.isnan(s)]
        if scores:
            pts.append((r.footprint.get("bytes", 0) / 2**20, 100 * sum(scores) / len(scores), r.name))
    if not pts:
        return None
    tasks = sorted({t for r in results for t in r.zero_shot})
    return _scatter(pts, path, xlabel="size in memory (MiB)", ylabel="mean zero-shot accuracy (%)",
                    title="Accuracy vs size: " + ", ".join(f"{t} ({HEADLINE_METRIC.get(t, 'acc')})" for t in tasks))


def build_report(results_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 title: str = "Results", preamble: str = "") -> Path:
    """Write ``RESULTS.md``, ``pareto.png`` and ``accuracy_vs_size.png``; return the Markdown path."""
    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir is not None else results_dir
    out.mkdir(parents=True, exist_ok=True)
    results = load_results(results_dir)
    if not results:
        raise ResultsError(f"no result JSON files in {results_dir}: write some with `llmdeploy eval MODEL --json "
                           f"{results_dir}/NAME.json` or benchmarks.run first")
    corpora = sorted({c for r in results for c in r.perplexity})
    parts = [f"# {title}\n", preamble.strip() + "\n" if preamble else "", markdown_table(results), ""]
    notes = [f"- **{r.name}**: {r.meta['note']}" for r in results if r.meta.get("note")]
    if notes:
        parts += ["Notes:\n", "\n".join(notes), ""]
    if corpora and plot_pareto(results, corpora[0], out / "pareto.png"):
        parts.append("![perplexity vs bits per parameter](pareto.png)\n")
    if plot_accuracy(results, out / "accuracy_vs_size.png"):
        parts.append("![accuracy vs size](accuracy_vs_size.png)\n")
    md = out / "RESULTS.md"
    md.write_text("\n".join(p for p in parts if p is not None) + "\n")
    log.info("report written to %s", md)
    return md
