"""AQLM matrix-vector kernels against dense matvec, measured in one run.

    python -m benchmarks.aqlm_kernels            # CPU: 2x8 and 1x16 layers of Llama-2-7B's MLP shape
    python -m benchmarks.aqlm_kernels --device cuda   # on a GPU: Triton kernels vs fp16 torch

Layer: out 11008, in 4096, batch 1 (one decode token), random codes and codebooks (speed does not
depend on the values). CPU rows, fp32 activations: torch's dense fp32 matvec; llmdeploy's lookup-
table kernel (on an AVX-512 CPU also its AVX2 gather path, for 2x8); the ``aqlm`` package's CPU kernel (its numba kernel for 8-bit codebooks, its
dequantize-then-matmul otherwise), through its ``QuantizedLinear``; the plain-torch reference.
Medians over blocks of calls that take turns, with pauses between blocks (see ``timeit``);
ratios are against dense measured in the same run. Writes
``benchmarks/results/kernels/aqlm_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmdeploy.quant.aqlm_linear import AQLMLinear, pack_codes

OUT, IN = 11008, 4096
RESULTS = Path(__file__).resolve().parent / "results" / "kernels"


def make_layer(num_codebooks: int, nbits: int, group: int, dtype=torch.float32, device="cpu") -> AQLMLinear:
    g = torch.Generator().manual_seed(0)
    m = AQLMLinear(IN, OUT, num_codebooks, nbits, group, bias=False, dtype=dtype)
    with torch.no_grad():
        m.codebooks.copy_(torch.randn(m.codebooks.shape, generator=g) * 0.05)
        m.scales.copy_(torch.rand(m.scales.shape, generator=g) + 0.5)
        m.codes.copy_(pack_codes(torch.randint(0, 2**nbits, m.codes.shape, generator=g), nbits))
    return m.to(device)


def aqlm_package_layer(m: AQLMLinear):
    """The same weights in the ``aqlm`` package's QuantizedLinear (None if not installed)."""
    try:
        from aqlm import QuantizedLinear
    except ImportError:
        return None
    q = QuantizedLinear(m.in_features, m.out_features, m.in_group_size, m.out_group_size, m.num_codebooks,
                        m.nbits_per_codebook, bias=False, dtype=m.codebooks.dtype)
    q.load_state_dict(m.state_dict())
    return q


def timeit(fns: dict, repeats: int, sync=lambda: None, rounds: int = 5, pause: float = 0.3) -> dict[str, float]:
    """Median milliseconds per call. Each kernel runs in blocks of ``repeats // rounds`` calls,
    the kernels taking turns for ``rounds`` rounds (drift hits all alike), with a pause before
    each block: torch's and numba's OpenMP pools spin for a while after a parallel call and
    would otherwise steal the cores of whichever kernel runs next."""
    for f in fns.values():  # warm-up (numba / triton compilation, caches)
        f()
        f()
    per_block = max(1, repeats // rounds)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            time.sleep(pause)
            f()
            for _ in range(per_block):
                sync()
                t = time.perf_counter()
                f()
                sync()
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _on_avx2(fn, *args):
    """``fn(*args)`` with the C kernels' AVX2 variant (on an AVX-512 CPU: the gather kernel that the
    AVX-512 permute kernel replaces for 256-entry codebooks)."""
    from llmdeploy.kernels import native

    with native.isa("avx2"):
        return fn(*args)


def run_cpu(repeats: int) -> list[dict]:
    from llmdeploy.kernels import aqlm_cpu, native

    rows = []
    x = torch.randn(1, IN)
    dense_w = torch.randn(OUT, IN) * 0.02
    for nc, nb, g in ((2, 8, 8), (1, 16, 8)):
        m = make_layer(nc, nb, g)
        pkg = aqlm_package_layer(m)
        with torch.no_grad():
            ref = m.forward_reference(x)
            ours = aqlm_cpu.aqlm_gemv(x, m)
            err = (ours - ref).abs().max().item()
            fns = {"dense fp32": lambda: F.linear(x, dense_w),
                   "llmdeploy kernel": lambda m=m: aqlm_cpu.aqlm_gemv(x, m),
                   "reference (dequantize + matmul)": lambda m=m: m.forward_reference(x)}
            if nb == 8 and aqlm_cpu.c_available() and aqlm_cpu._c("aqlm_simd")() == 512 \
                    and "avx2" in native.available_isas():
                fns["llmdeploy kernel, AVX2 path"] = lambda m=m: _on_avx2(aqlm_cpu.aqlm_gemv, x, m)
            if pkg is not None:
                pkg_err = (pkg(x) - ref).abs().max().item()
                fns["aqlm package"] = lambda pkg=pkg: pkg(x)
            ms = timeit(fns, repeats)
        for name, t in ms.items():
            rows.append({"config": f"{nc}x{nb} g{g}", "kernel": name, "ms": t,
                         "speedup_vs_dense": ms["dense fp32"] / t,
                         "speedup_vs_aqlm_package": (ms["aqlm package"] / t) if "aqlm package" in ms else None,
                         "max_abs_err_vs_reference": err if name.startswith("llmdeploy kernel") else
                         (pkg_err if name == "aqlm package" else 0.0)})
    return rows


def run_cuda(repeats: int) -> list[dict]:
    from llmdeploy.kernels import aqlm_triton

    rows = []
    x = torch.randn(1, IN, device="cuda", dtype=torch.float16)
    dense_w = (torch.randn(OUT, IN, device="cuda") * 0.02).half()
    for nc, nb, g in ((2, 8, 8), (1, 16, 8)):
        m = make_layer(nc, nb, g, dtype=torch.float16, device="cuda")
        with torch.no_grad():
            ref = m.forward_reference(x)
            err = (aqlm_triton.aqlm_gemv(x, m) - ref).abs().max().item()
            ms = timeit({"dense fp16": lambda: F.linear(x, dense_w),
                         "triton gemv": lambda m=m: aqlm_triton.aqlm_gemv(x, m),
                         "triton dequantize + matmul": lambda m=m: aqlm_triton.aqlm_dequant_matmul(x, m)},
                        repeats, sync=torch.cuda.synchronize)
        for name, t in ms.items():
            rows.append({"config": f"{nc}x{nb} g{g}", "kernel": name, "ms": t,
                         "speedup_vs_dense": ms["dense fp16"] / t,
                         "max_abs_err_vs_reference": err if name == "triton gemv" else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=100)
    args = p.parse_args(argv)
    rows = run_cpu(args.repeats) if args.device == "cpu" else run_cuda(args.repeats)
    meta = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "shape": [OUT, IN], "batch": 1,
            "repeats": args.repeats}
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"aqlm_{args.device}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# AQLM matvec, {OUT}x{IN}, batch 1, {args.device} ({meta['threads']} threads)", "",
             "| config | kernel | ms (median) | × vs dense | × vs aqlm package | max abs err vs reference |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        vs_pkg = r.get("speedup_vs_aqlm_package")
        err = r.get("max_abs_err_vs_reference")
        lines.append(f"| {r['config']} | {r['kernel']} | {r['ms']:.3f} | {r['speedup_vs_dense']:.2f} | "
                     f"{'—' if vs_pkg is None else f'{vs_pkg:.2f}'} | {'—' if err is None else f'{err:.2e}'} |")
    (RESULTS / f"aqlm_{args.device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
