"""Autoscaling policies on replayed traces, with service times measured on this machine (issue #19).

    python -m benchmarks.autoscale                  # measures smollm2-135m, then simulates
    python -m benchmarks.autoscale --duration 7200 --seeds 0 1 2 3

The profile (prefill seconds per token, decode step t(b) = a + c·b, KV bytes per token, weight
bytes) is measured on ``smollm2-135m`` with the paged engine (``llmdeploy.deploy.measure_profile``,
medians of 3) and saved in the JSON; so is a replica's cold start: `llmdeploy serve` of a saved
``smollm2-135m`` checkpoint started until it answers ``/v1/models`` (median of 3). Each seeded trace
(poisson, diurnal, bursty; seeds 0–2; ``--rate`` requests/s on average, prompts of 128 and outputs
of 64 tokens, SLO: p95 time to first token ≤ 2 s) is replayed against: the cheapest static
allocation whose SLO attainment is ≥ 95 % (searched), the static allocation the recommender gives
for the mean rate, ENOVA's open-code rules, and the ENOVA-style policy; the autoscaled ones start
at the recommendation for the mean rate and observe the metrics every 5 s. Replicas have ``--memory-gib`` each, are billed from the
moment they are asked for until their last request ends, and start in the measured cold start —
and, as a second scenario, in 30 s (a bigger model, or one loaded from GGUF, which takes ~40 s
here). Writes ``results/autoscale/autoscale.json``, ``AUTOSCALE.md`` and ``autoscale.png``.
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
INTERVAL = 5.0  # seconds between the autoscaler's observations


def run(profile: Profile, rate: float, duration: float, memory: int, seeds: tuple[int, ...],
        startups: dict[str, float]) -> dict:
    load = Workload(request_rate=rate, prompt_tokens=128, output_tokens=64, ttft_slo=2.0, tpot_slo=0.25)
    rec = recommend(profile, load, memory)
    rows: dict = {}
    for scenario, startup in startups.items():
        for kind in TRACES:
            for seed in seeds:
                times = arrivals(kind, duration, rate, seed=seed)
                kw = {"max_batch": rec.max_batch, "startup_s": startup, "interval_s": INTERVAL}
                out = {}
                for n in range(1, 200):
                    r = simulate(times, Static(n), profile, load, initial_replicas=n, **kw)
                    if r.attainment >= 0.95:
                        out[f"static, cheapest meeting the SLO ({n})"] = r
                        break
                out[f"static, recommended for the mean rate ({rec.replicas})"] = simulate(
                    times, Static(rec.replicas), profile, load, initial_replicas=rec.replicas, **kw)
                out["ENOVA rules (open code)"] = simulate(times, ENOVARules(max_batch=rec.max_batch, interval_s=INTERVAL), profile, load,
                                                          initial_replicas=rec.replicas, **kw)
                out["ENOVA-style (detection + recommender)"] = simulate(
                    times, ENOVAPolicy(profile, load, memory), profile, load, initial_replicas=rec.replicas, **kw)
                rows[f"{scenario}/{kind}/{seed}"] = {
                    name: {**r.summary(), "replicas_over_time": [(o.time, o.replicas) for o in r.timeline],
                           "rate_over_time": [(o.time, o.arrivals_per_s) for o in r.timeline]}
                    for name, r in out.items()}
    goal = {}
    for key, r in rows.items():
        static = next(v for n, v in r.items() if n.startswith("static, cheapest"))
        enova = r["ENOVA-style (detection + recommender)"]
        goal[key] = {"meets_slo": enova["slo_attainment"] >= 0.95,
                     "cost_vs_cheapest_static": enova["replica_seconds"] / static["replica_seconds"]}
    return {"recommendation": rec.to_dict(), "workload": asdict(load), "rows": rows, "goal": goal}


def markdown(res: dict) -> str:
    m, p = res["meta"], res["profile"]
    st = m["startup_s"]
    lines = [f"# Autoscaling on replayed traces (`python -m benchmarks.autoscale`, {m['date']})", "",
             f"Service times measured on `smollm2-135m` here ({m['threads']} CPU threads): prefill "
             f"{p['prefill_s_per_token'] * 1e3:.3f} ms/token, decode step {p['decode_a'] * 1e3:.1f} + "
             f"{p['decode_c'] * 1e3:.2f}·b ms, KV {p['kv_bytes_per_token'] / 1024:.1f} KiB/token; a replica's cold "
             f"start (`llmdeploy serve` of a saved checkpoint until it answers) {st['measured']:.1f} s "
             f"(median of {len(m['cold_starts_s'])}: {', '.join(f'{x:.1f}' for x in m['cold_starts_s'])}). Traces "
             f"of {m['duration']:.0f} s at {m['rate']} requests/s on average (seeds "
             f"{', '.join(map(str, m['seeds']))}), prompts 128 + outputs 64 tokens; SLO: time to first token ≤ 2 s "
             f"for 95% of requests; replicas of {m['memory_gib']} GiB (max batch {res['recommendation']['max_batch']}), "
             "billed from the request until their last request ends; the autoscaled policies start at the "
             f"recommendation for the mean rate ({res['recommendation']['replicas']}) and observe the metrics every "
             f"{INTERVAL:.0f} s.", "",
             "ENOVA-style policy against the cheapest static allocation that meets the SLO (replica-seconds ratio; "
             "✓ the policy meets the SLO):", "",
             "| cold start | trace | " + " | ".join(f"seed {s}" for s in m["seeds"]) + " |",
             "|---|---|" + "---|" * len(m["seeds"])]
    for scenario in st:
        for kind in TRACES:
            cells = []
            for seed in m["seeds"]:
                g = res["goal"][f"{scenario}/{kind}/{seed}"]
                cells.append(f"{g['cost_vs_cheapest_static']:.2f} {'✓' if g['meets_slo'] else '✗'}")
            how = "measured" if scenario == "measured" else "assumed"
            lines.append(f"| {st[scenario]:.0f} s ({how}) | {kind} | " + " | ".join(cells) + " |")
    lines += ["", "| cold start | trace | seed | policy | SLO attainment | p95 TTFT (s) | replica-seconds | max replicas |",
              "|---|---|---|---|---|---|---|---|"]
    for key, rows in res["rows"].items():
        scenario, kind, seed = key.split("/")
        for name, r in rows.items():
            lines.append(f"| {st[scenario]:.0f} s | {kind} | {seed} | {name} | {r['slo_attainment']:.1%} | "
                         f"{r['p95_ttft_s']:.2f} | {r['replica_seconds']:.0f} | {r['max_replicas']} |")
    return "\n".join(lines) + "\n"


def cold_start(checkpoint: str, repeats: int = 3, timeout: float = 300.0) -> list[float]:
    """Seconds from launching ``llmdeploy serve CHECKPOINT`` to its first answer on /v1/models."""
    import http.client
    import shutil
    import subprocess

    from llmdeploy.serve import free_port

    out = []
    for _ in range(repeats):
        port = free_port()
        t0 = time.perf_counter()
        proc = subprocess.Popen([shutil.which("llmdeploy") or "llmdeploy", "serve", checkpoint, "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                if proc.poll() is not None or time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"llmdeploy serve {checkpoint} did not start")
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                    conn.request("GET", "/v1/models")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    time.sleep(0.05)
            out.append(time.perf_counter() - t0)
        finally:
            proc.terminate()
            proc.wait(30)
    return out


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = res["meta"]["seeds"][0]
    keys = [f"measured/{kind}/{seed}" for kind in TRACES]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, r in res["rows"][key].items():
            t, n = zip(*r["replicas_over_time"])
            ax.step(t, n, where="post", label=name, lw=1)
        t, q = zip(*next(iter(res["rows"][key].values()))["rate_over_time"])
        ax2 = ax.twinx()
        ax2.plot(t, q, color="gray", alpha=0.3, lw=0.8)
        ax2.set_ylabel("arrivals / s", color="gray")
        ax.set(title=f"{key.split('/')[1]} (seed {seed}, measured cold start)", xlabel="seconds", ylabel="replicas")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=6.0)
    p.add_argument("--duration", type=float, default=3600)
    p.add_argument("--memory-gib", type=float, default=4.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    import tempfile

    import torch

    RESULTS.mkdir(parents=True, exist_ok=True)
    model, tok = llmdeploy.load("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        llmdeploy.save(model, tok, tmp)
        starts = cold_start(tmp)
    profile = measure_profile(model.eval(), batch_sizes=(1, 2, 4, 8), prompt_len=128, decode_steps=16, repeats=3)
    startups = {"measured": sorted(starts)[len(starts) // 2], "30 s": 30.0}
    res = run(profile, args.rate, args.duration, int(args.memory_gib * 2**30), tuple(args.seeds), startups)
    res["profile"] = asdict(profile)
    res["meta"] = {"date": time.strftime("%Y-%m-%d"), "rate": args.rate, "duration": args.duration,
                   "memory_gib": args.memory_gib, "seeds": args.seeds, "threads": torch.get_num_threads(),
                   "cold_starts_s": starts, "startup_s": startups}
    slim = json.loads(json.dumps(res))
    for rows in slim["rows"].values():  # the JSON keeps the timelines thinned; the table does not need them
        for r in rows.values():
            r["replicas_over_time"] = r["replicas_over_time"][::6]
            r["rate_over_time"] = r["rate_over_time"][::6]
    (RESULTS / "autoscale.json").write_text(json.dumps(slim, separators=(",", ":")))  # compact: timelines
    (RESULTS / "AUTOSCALE.md").write_text(markdown(res))
    plot(res, RESULTS / "autoscale.png")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
