"""Compressing block by block from disk (issue #20): peak memory of streamed vs in-memory runs, and
the speed of 2 processes vs 1 on this machine's 2 cores.

    python -m benchmarks.streaming                 # memory and speed
    python -m benchmarks.streaming --part memory
    python -m benchmarks.streaming --part speed --repeats 3

Sources (written once to ``results/streaming/cache``, git-ignored): SmolLM2-135M (the embedded
GGUF, dequantized to float32, saved as a Hugging Face checkpoint in 100 MB shards) and a synthetic
model of the same width and 4x the depth (120 blocks, random weights, tied embeddings, same
shards). Every run is its own Python process, so peak resident memory (``VmHWM``) is the run's:
recorded are the peak, the resident memory just before compressing (after imports, tokenizer and
calibration windows: the same in every mode), and their difference — the memory the compression
itself took. In-memory mode loads the checkpoint with ``llmdeploy.load`` and saves with
``llmdeploy.save``; streamed mode is ``llmdeploy.compress_streaming`` (activations spilled to
disk). Both read the same files and write the same output format.

Calibration: 16 windows of 256 tokens of the Shakespeare train split (a memory and speed
measurement, not a quality claim; both modes use the same windows and produce the same model).

Speed: GPTQ 4-bit in memory on SmolLM2 with 32 windows of 256 tokens, one process with 2 threads
against ``torchrun --nproc_per_node 2`` (gloo, 1 thread each; each process takes half the windows,
statistics all-reduced), repeated and interleaved; the time is the compression step's (load and
save excluded), the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "streaming"
CACHE = RESULTS / "cache"
METHODS = {"gptq": "GPTQ(bits=4, group_size=64)", "sparsegpt": "SparseGPT(sparsity=0.5)"}


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(line.split()[1]) * 1024
    return out


def _sources() -> dict[str, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import llmdeploy

    small, deep = CACHE / "smollm2-135m", CACHE / "smollm2-width-4x-depth"
    if not (small / "config.json").exists():
        model, tok = llmdeploy.load("smollm2-135m")
        model.save_pretrained(small, max_shard_size="100MB")
        tok.save_pretrained(small)
    if not (deep / "config.json").exists():
        cfg = LlamaConfig.from_pretrained(small)
        cfg.num_hidden_layers *= 4
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        model = model.to_empty(device="cpu")
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            with torch.no_grad():
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)
        model.save_pretrained(deep, max_shard_size="100MB")
        llmdeploy.load("smollm2-135m")[1].save_pretrained(deep)
        del model
    return {"smollm2-135m": small, "4x depth (120 blocks)": deep}


def child(mode: str, method: str, src: str, out: str, n: int, seq: int) -> None:
    """One measured run (in its own process); prints a JSON line."""
    import torch  # noqa: F401

    import llmdeploy
    from llmdeploy.data import calibration
    from llmdeploy.io.loading import _tokenizer
    from llmdeploy.prune import SparseGPT  # noqa: F401
    from llmdeploy.quant import GPTQ  # noqa: F401

    tok = _tokenizer(Path(src))
    calib = calibration(tok, "shakespeare", n_samples=n, seq_len=seq, seed=0)
    step = eval(METHODS[method])
    before = _status()["VmRSS"]
    t0 = time.perf_counter()
    if mode == "stream":
        llmdeploy.compress_streaming(src, [step], calib, out)
    else:
        model, _ = llmdeploy.load(src)
        model = step(model, calib)
        llmdeploy.save(model, tok, out)
    seconds = time.perf_counter() - t0
    peak = _status()["VmHWM"]
    print(json.dumps({"before": before, "peak": peak, "seconds": seconds}))


def _run_child(mode: str, method: str, src: Path, n: int, seq: int) -> dict:
    out = CACHE / f"out-{mode}-{method}"
    res = subprocess.run([sys.executable, "-m", "benchmarks.streaming", "--child", mode, method, str(src), str(out),
                          str(n), str(seq)], capture_output=True, text=True, timeout=3600,
                         cwd=Path(__file__).resolve().parents[1])
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def memory(n: int, seq: int) -> list[dict]:
    rows = []
    sources = _sources()
    plan = [(model, mode, method) for model in sources for method in METHODS for mode in ("memory", "stream")
            if not (model.startswith("4x") and (mode == "memory" or method == "sparsegpt"))]
    for model, mode, method in plan:
        r = _run_child(mode, method, sources[model], n, seq)
        r.update(model=model, mode=mode, method=method, used=r["peak"] - r["before"])
        print(f"{model:24s} {method:10s} {mode:7s} peak {r['peak'] / 2**20:7.0f} MiB, compression "
              f"{r['used'] / 2**20:7.0f} MiB, {r['seconds']:6.1f} s", flush=True)
        rows.append(r)
    return rows


SPEED_CHILD = """
import json, sys, time, torch, llmdeploy
from llmdeploy.compress.distributed import init_from_env, is_main
from llmdeploy.data import calibration
from llmdeploy.quant import GPTQ
threads, src, n, seq = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
init_from_env()
model, tok = llmdeploy.load(src)
calib = calibration(tok, "shakespeare", n_samples=n, seq_len=seq, seed=0)
if torch.distributed.is_initialized():
    torch.distributed.barrier()
t0 = time.perf_counter()
GPTQ(bits=4, group_size=64)(model, calib)
if torch.distributed.is_initialized():
    torch.distributed.barrier()
if is_main():
    print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


PHASES_CHILD = SPEED_CHILD.replace("t0 = time.perf_counter()", """import collections, functools
from llmdeploy.compress import engine
from llmdeploy.quant import gptq as G
T = collections.Counter()
def timed(obj, name, label):
    f = getattr(obj, name)
    @functools.wraps(f)
    def w(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); T[label] += time.perf_counter() - t; return r
    setattr(obj, name, w)
for obj, name, label in [(engine.BlockContext, "collect_stats", "statistics (XtX, incl. all-reduce)"),
                         (engine, "all_reduce_", "of which all-reduce"),
                         (engine.BlockContext, "forward", "block outputs"),
                         (G, "gptq_hinv", "inverse-Hessian factors"), (G, "gptq_quantize", "column walk"),
                         (G, "gather_rows", "gathering rows"), (G, "layer_error", "report errors")]:
    timed(obj, name, label)
t0 = time.perf_counter()""").replace(
    """if is_main():
    print(json.dumps({"seconds": time.perf_counter() - t0}))""",
    """T["total"] = time.perf_counter() - t0
print(json.dumps({"rank": torch.distributed.get_rank() if torch.distributed.is_initialized() else 0,
                  "phases": dict(T)}), flush=True)""")


def phases(n: int, seq: int) -> list[dict]:
    """One instrumented run of each setup: seconds per phase, per process (where the time goes)."""
    from llmdeploy.kv.distributed import free_port

    src = _sources()["smollm2-135m"]
    script = CACHE / "phases_child.py"
    script.write_text(PHASES_CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = []
    for name, cmd in (("1 process x 2 threads", [sys.executable, str(script), "2", str(src), str(n), str(seq)]),
                      ("2 processes x 1 thread (gloo)",
                       [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(script), "1", str(src), str(n), str(seq)])):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
        if res.returncode:
            raise RuntimeError(res.stderr[-3000:])
        for line in res.stdout.splitlines():
            if line.startswith("{"):
                d = json.loads(line)
                out.append({"setup": name, "rank": d["rank"], "phases": d["phases"]})
                print(name, d, flush=True)
    return sorted(out, key=lambda r: (r["setup"], r["rank"]))


def speed(repeats: int, n: int, seq: int) -> list[dict]:
    from llmdeploy.kv.distributed import free_port

    src = _sources()["smollm2-135m"]
    script = CACHE / "speed_child.py"
    script.write_text(SPEED_CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs: dict[str, list[float]] = {"1 process x 2 threads": [], "2 processes x 1 thread (gloo)": []}
    for r in range(repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            if name.startswith("1"):
                cmd = [sys.executable, str(script), "2", str(src), str(n), str(seq)]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                       str(free_port()), str(script), "1", str(src), str(n), str(seq)]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
            if res.returncode:
                raise RuntimeError(res.stderr[-3000:])
            sec = json.loads(res.stdout.strip().splitlines()[-1])["seconds"]
            runs[name].append(sec)
            print(f"{name}: {sec:.1f} s", flush=True)
    return [{"setup": k, "seconds": v, "median": statistics.median(v)} for k, v in runs.items()]


def write(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "streaming.json").write_text(json.dumps(result, indent=2))
    lines = ["# Compressing block by block from disk (issue #20)", "",
             f"Generated by `python -m benchmarks.streaming` on {result['machine']}. Calibration: "
             f"{result['n_samples']} windows of {result['seq_len']} tokens (memory), "
             f"{result.get('speed_n_samples', '-')} windows (speed).", "",
             "## Peak resident memory", "",
             "Peak = the run's whole process (Python, torch, transformers, llmdeploy included); "
             "compression = peak minus the resident memory just before compressing (imports, tokenizer "
             "and calibration windows, the same in every mode).", "",
             "| model | method | mode | peak (MiB) | compression (MiB) | streamed / in memory (peak) | "
             "streamed / in memory (compression) | seconds (one run, not a speed claim) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    mem = result.get("memory", [])
    ref = {(r["method"]): r for r in mem if r["mode"] == "memory" and r["model"] == "smollm2-135m"}
    for r in mem:
        base = ref.get(r["method"])
        ratio_peak = f"{r['peak'] / base['peak']:.1%}" if base and r["mode"] == "stream" else ""
        ratio_used = f"{r['used'] / base['used']:.1%}" if base and r["mode"] == "stream" else ""
        lines.append(f"| {r['model']} | {r['method']} | {r['mode']} | {r['peak'] / 2**20:.0f} | "
                     f"{r['used'] / 2**20:.0f} | {ratio_peak} | {ratio_used} | {r['seconds']:.1f} |")
    if result.get("speed"):
        lines += ["", "## 2 processes vs 1 (GPTQ 4-bit in memory, smollm2-135m)", "",
                  "| setup | median seconds | runs |", "|---|---:|---|"]
        for s in result["speed"]:
            lines.append(f"| {s['setup']} | {s['median']:.1f} | {', '.join(f'{x:.1f}' for x in s['seconds'])} |")
    if result.get("phases"):
        order = ["statistics (XtX, incl. all-reduce)", "of which all-reduce", "block outputs", "inverse-Hessian factors",
                 "column walk", "gathering rows", "report errors", "total"]
        keys = [k for k in order if any(k in r["phases"] for r in result["phases"])]
        lines += ["", "Where the time goes (one instrumented run of each setup, seconds per process; timers "
                  "nest: the all-reduces are also counted inside the statistics, where almost all of them happen; "
                  "the column walk excludes the factors, which GPTQ computes once per shared XtX):", "",
                  "| setup | process | " + " | ".join(keys) + " |", "|---|---|" + "---:|" * len(keys)]
        for r in result["phases"]:
            lines.append(f"| {r['setup']} | {r['rank']} | " + " | ".join(f"{r['phases'].get(k, 0):.1f}" for k in keys)
                         + " |")
    (RESULTS / "STREAMING.md").write_text("\n".join(lines) + "\n")
    if mem:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.5))
        labels = [f"{r['model'].split(' ')[0]}\n{r['method']} {r['mode']}" for r in mem]
        ax.bar(range(len(mem)), [r["peak"] / 2**20 for r in mem], label="peak")
        ax.bar(range(len(mem)), [r["used"] / 2**20 for r in mem], label="compression (peak - before)")
        ax.set_xticks(range(len(mem)), labels, fontsize=7)
        ax.set_ylabel("MiB")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "streaming.png", dpi=120)


def sources_info() -> dict[str, dict]:
    """Size on disk and depth of each source checkpoint."""
    from llmdeploy.io.stream import checkpoint_bytes

    out = {}
    for name, path in _sources().items():
        cfg = json.loads((path / "config.json").read_text())
        out[name] = {"bytes": checkpoint_bytes(path), "blocks": cfg["num_hidden_layers"]}
    return out


def readme_paragraph(res: dict) -> str:
    """The README's sentence on streaming, from ``streaming.json`` (a test checks the README)."""
    mem = {(r["model"], r["method"], r["mode"]): r for r in res["memory"]}
    small = "smollm2-135m"
    deep = next(m for m, _, _ in mem if m != small)
    parts = []
    for method in METHODS:
        s, m = mem[(small, method, "stream")], mem[(small, method, "memory")]
        parts.append(f"{method} {s['peak'] / 2**20:.0f} MiB streamed against {m['peak'] / 2**20:.0f} MiB in memory "
                     f"({s['peak'] / m['peak']:.0%}); the compression's own share, above the resident memory "
                     f"before it starts: {s['used'] / 2**20:.0f} against {m['used'] / 2**20:.0f} MiB "
                     f"({s['used'] / m['used']:.0%})")
    d = mem[(deep, "gptq", "stream")]
    text = (f"Peak resident memory compressing SmolLM2-135M ({res['n_samples']} calibration windows of "
            f"{res['seq_len']} tokens, whole process): " + "; ".join(parts) +
            f". The same width at 4x the depth ({res['sources'][deep]['blocks']} blocks, "
            f"{res['sources'][deep]['bytes'] / 2**30:.2f} GiB in float32) streams GPTQ in "
            f"{d['peak'] / 2**20:.0f} MiB ({d['used'] / 2**20:.0f} MiB above the start)")
    if res.get("speed"):
        one, two = (next(x for x in res["speed"] if x["setup"].startswith(k)) for k in ("1", "2"))
        text += (f"; GPTQ on 2 processes (gloo) takes {two['median']:.1f} s against {one['median']:.1f} s in one "
                 f"process on this machine's 2 cores ({one['median'] / two['median']:.2f}x)")
    return text + (" ([benchmarks/results/streaming/STREAMING.md](benchmarks/results/streaming/STREAMING.md), "
                   "`python -m benchmarks.streaming`).")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", nargs=6, metavar=("MODE", "METHOD", "SRC", "OUT", "N", "SEQ"))
    p.add_argument("--part", choices=["memory", "speed", "phases", "all"], default="all")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--speed-n-samples", type=int, default=32)
    args = p.parse_args()
    if args.child:
        mode, method, src, out, n, seq = args.child
        child(mode, method, src, out, int(n), int(seq))
        return
    old = json.loads((RESULTS / "streaming.json").read_text()) if (RESULTS / "streaming.json").exists() else {}
    result = {"machine": f"{os.cpu_count()} CPU cores", "n_samples": args.n_samples, "seq_len": args.seq_len,
              "memory": old.get("memory", []), "speed": old.get("speed", []),
              "speed_n_samples": old.get("speed_n_samples"), "sources": old.get("sources", {}),
              "phases": old.get("phases", [])}
    if args.part in ("memory", "all"):
        result["memory"] = memory(args.n_samples, args.seq_len)
        result["sources"] = sources_info()
    if args.part in ("speed", "all"):
        result["speed"] = speed(args.repeats, args.speed_n_samples, args.seq_len)
        result["speed_n_samples"] = args.speed_n_samples
    if args.part in ("phases", "all"):
        result["phases"] = phases(args.speed_n_samples, args.seq_len)
    write(result)


if __name__ == "__main__":
    main()
