"""Autoscaling policies on replayed traces, with service times measured on this machine (issue #19).

    python -m benchmarks.autoscale                  # measures smollm2-135m, then simulates
    python -m benchmarks.autoscale --duration 3600

The profile (prefill seconds per token, decode step t(b) = a + c·b, KV bytes per token, weight
bytes) is measured on ``smollm2-135m`` with the paged engine (``llmdeploy.deploy.measure_profile``,
medians of 3) and saved in the JSON. Each seeded trace (poisson, diurnal, bursty; ``--rate``
requests/s on average, prompts of 128 and outputs of 64 tokens, SLO: p95 time to first token
≤ 2 s) is replayed against: the cheapest static allocation whose SLO attainment is ≥ 95 %
(searched), the static allocation the recommender gives for the mean rate, ENOVA's open-code
rules, and the ENOVA-style policy (the recommender in the loop). Replicas have ``--memory-gib``
each, start in 30 s, and are billed from the moment they are asked for. Writes
``results/autoscale/autoscale.json``, ``AUTOSCALE.md`` and ``autoscale.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import llmdeploy
from llmdeploy.deploy import Profile, Workload, measure_profile, recommend
from llmdeploy.deploy.autoscale import ENOVAPolicy, ENOVARules, Static, arrivals, simulate

RESULTS = Path(__file__).resolve().parent / "results" / "autoscale"
TRACES = ("poisson", "diurnal", "bursty")


def run(profile: Profile, rate: float, duration: float, memory: int, seed: int) -> dict:
    load = Workload(request_rate=rate, prompt_tokens=128, output_tokens=64, ttft_slo=2.0, tpot_slo=0.25)
    rec = recommend(profile, load, memory)
    rows: dict = {}
    for kind in TRACES:
        times = arrivals(kind, duration, rate, seed=seed)
        kw = {"max_batch": rec.max_batch}
        out = {}
        for n in range(1, 200):
            r = simulate(times, Static(n), profile, load, initial_replicas=n, **kw)
            if r.attainment >= 0.95:
                out[f"static, cheapest meeting the SLO ({n})"] = r
                break
        out[f"static, recommended for the mean rate ({rec.replicas})"] = simulate(
            times, Static(rec.replicas), profile, load, initial_replicas=rec.replicas, **kw)
        out["ENOVA rules (open code)"] = simulate(times, ENOVARules(max_batch=rec.max_batch), profile, load, **kw)
        out["ENOVA-style (recommender in the loop)"] = simulate(times, ENOVAPolicy(profile, load, memory), profile,
                                                               load, **kw)
        rows[kind] = {name: {**r.summary(), "replicas_over_time": [(o.time, o.replicas) for o in r.timeline],
                             "rate_over_time": [(o.time, o.arrivals_per_s) for o in r.timeline]}
                      for name, r in out.items()}
    return {"recommendation": rec.to_dict(), "workload": asdict(load), "rows": rows}


def markdown(res: dict) -> str:
    m, p = res["meta"], res["profile"]
    lines = [f"# Autoscaling on replayed traces (`python -m benchmarks.autoscale`, {m['date']})", "",
             f"Service times measured on `smollm2-135m` here ({m['threads']} CPU threads): prefill "
             f"{p['prefill_s_per_token'] * 1e3:.3f} ms/token, decode step {p['decode_a'] * 1e3:.1f} + "
             f"{p['decode_c'] * 1e3:.2f}·b ms, KV {p['kv_bytes_per_token'] / 1024:.1f} KiB/token. Traces of "
             f"{m['duration']:.0f} s at {m['rate']} requests/s on average (seed {m['seed']}), prompts 128 + outputs "
             f"64 tokens; SLO: time to first token ≤ 2 s for 95% of requests; replicas of {m['memory_gib']} GiB "
             f"(max batch {res['recommendation']['max_batch']}), 30 s to start, billed from the request.", "",
             "| trace | policy | SLO attainment | p95 TTFT (s) | replica-seconds | max replicas |", "|---|---|---|---|---|---|"]
    for kind, rows in res["rows"].items():
        for name, r in rows.items():
            lines.append(f"| {kind} | {name} | {r['slo_attainment']:.1%} | {r['p95_ttft_s']:.2f} | "
                         f"{r['replica_seconds']:.0f} | {r['max_replicas']} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(res["rows"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for name, r in res["rows"][kind].items():
            t, n = zip(*r["replicas_over_time"])
            ax.step(t, n, where="post", label=name, lw=1)
        t, q = zip(*next(iter(res["rows"][kind].values()))["rate_over_time"])
        ax2 = ax.twinx()
        ax2.plot(t, q, color="gray", alpha=0.3, lw=0.8)
        ax2.set_ylabel("arrivals / s", color="gray")
        ax.set(title=kind, xlabel="seconds", ylabel="replicas")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=6.0)
    p.add_argument("--duration", type=float, default=7200)
    p.add_argument("--memory-gib", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import torch

    RESULTS.mkdir(parents=True, exist_ok=True)
    model, _ = llmdeploy.load("smollm2-135m")
    profile = measure_profile(model.eval(), batch_sizes=(1, 2, 4, 8), prompt_len=128, decode_steps=16, repeats=3)
    res = run(profile, args.rate, args.duration, int(args.memory_gib * 2**30), args.seed)
    res["profile"] = asdict(profile)
    res["meta"] = {"date": time.strftime("%Y-%m-%d"), "rate": args.rate, "duration": args.duration,
                   "memory_gib": args.memory_gib, "seed": args.seed, "threads": torch.get_num_threads()}
    slim = json.loads(json.dumps(res))
    for rows in slim["rows"].values():  # the JSON keeps the timelines; the table does not need them
        for r in rows.values():
            r["replicas_over_time"] = r["replicas_over_time"][::6]
            r["rate_over_time"] = r["rate_over_time"][::6]
    (RESULTS / "autoscale.json").write_text(json.dumps(slim, indent=1))
    (RESULTS / "AUTOSCALE.md").write_text(markdown(res))
    plot(res, RESULTS / "autoscale.png")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
