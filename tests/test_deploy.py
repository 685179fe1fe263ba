"""ENOVA-style deployment decisions (issue #19): the recommender's configurations fit the memory
they were given and meet their SLOs; the anomaly detectors on seeded traces."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import llmdeploy
from llmdeploy.deploy import (
    Profile,
    RuleDetector,
    VAEDetector,
    Workload,
    evaluate_detector,
    measure_profile,
    p95_ttft,
    recommend,
    semi_supervised_labels,
    synthetic_trace,
)
from llmdeploy.deploy.recommend import _erlang_c
from llmdeploy.errors import ConfigError
from llmdeploy.serve import ServingEngine


def test_recommendations_fit_their_memory_and_meet_their_slos():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        prof = Profile(weight_bytes=int(rng.uniform(1e8, 2e10)), kv_bytes_per_token=float(rng.uniform(2e3, 4e5)),
                       prefill_s_per_token=float(rng.uniform(1e-5, 2e-3)), decode_a=float(rng.uniform(5e-3, 0.08)),
                       decode_c=float(rng.uniform(0, 5e-3)), max_model_len=8192)
        load = Workload(request_rate=float(rng.uniform(0.1, 50)), prompt_tokens=float(rng.integers(16, 2048)),
                        output_tokens=float(rng.integers(16, 1024)), ttft_slo=float(rng.uniform(1, 10)),
                        tpot_slo=float(rng.uniform(0.05, 0.3)))
        memory = int(rng.uniform(1, 80) * 2**30)
        try:
            r = recommend(prof, load, memory, gpu_memory_bytes=memory)
        except ConfigError:
            continue  # nothing fits: said, not guessed
        checked += 1
        block_bytes = prof.kv_bytes_per_token * r.block_size
        assert r.memory_used_bytes <= memory * 0.9 + 1  # weights + KV within the memory (10% reserve)
        assert prof.weight_bytes + r.kv_blocks * block_bytes <= memory
        per_request = math.ceil((load.prompt_tokens + load.output_tokens) / r.block_size)
        assert r.max_batch * per_request <= r.kv_blocks  # a full batch of full requests fits the KV
        assert prof.decode_step(r.max_batch) <= load.tpot_slo + 1e-12
        assert r.p95_ttft_s <= load.ttft_slo and r.utilization <= 0.8 + 1e-9
        assert 0 < r.vllm_args["gpu_memory_utilization"] <= 0.95 and r.vllm_args["max_num_seqs"] == r.max_batch
    assert checked > 100


def test_recommender_says_what_does_not_fit():
    prof = Profile(weight_bytes=2 * 2**30, kv_bytes_per_token=1e5, prefill_s_per_token=1e-4, decode_a=0.02,
                   decode_c=1e-3, max_model_len=4096)
    with pytest.raises(ConfigError, match="compress the model"):
        recommend(prof, Workload(request_rate=1), memory_bytes=2 * 2**30)
    with pytest.raises(ConfigError, match="per-token SLO"):
        recommend(prof, Workload(request_rate=1, tpot_slo=0.01), memory_bytes=16 * 2**30)
    with pytest.raises(ConfigError, match="context"):
        recommend(prof, Workload(request_rate=1, prompt_tokens=4000, output_tokens=200), memory_bytes=16 * 2**30)


def test_queueing_estimate():
    assert _erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: an arrival waits with probability rho
    assert _erlang_c(2, 1.0) == pytest.approx(1 / 3)  # M/M/2 at a = 1 (textbook value)
    t = [p95_ttft(8.0, c, 1.0, 0.1) for c in (9, 10, 12, 16)]
    assert t == sorted(t, reverse=True) and t[-1] == pytest.approx(0.1)  # more servers: less waiting
    assert p95_ttft(8.0, 8, 1.0, 0.1) == math.inf


def test_measured_profile_gives_a_configuration_the_server_runs():
    model, _ = llmdeploy.load("tiny-llama")
    prof = measure_profile(model.eval(), batch_sizes=(1, 4), prompt_len=16, decode_steps=4, repeats=1)
    assert prof.decode_step(1) > 0 and prof.kv_bytes_per_token > 0 and prof.weight_bytes > 0
    r = recommend(prof, Workload(request_rate=2.0, prompt_tokens=32, output_tokens=16, ttft_slo=5.0, tpot_slo=1.0),
                  memory_bytes=64 * 2**20)
    engine = ServingEngine(model, max_batch=r.max_batch, kv_blocks=r.kv_blocks, block_size=r.block_size)
    assert engine.cache.blocks.capacity == r.kv_blocks
    from llmdeploy.cli.main import build_parser

    args = build_parser().parse_args(r.serve_command("tiny-llama").split()[1:])
    assert (args.max_batch, args.kv_blocks) == (r.max_batch, r.kv_blocks)


def test_traces_are_seeded_and_labelled():
    a, b = synthetic_trace(600, seed=3), synthetic_trace(600, seed=3)
    assert np.array_equal(a.values, b.values) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.values, synthetic_trace(600, seed=4).values)
    assert 0.05 <= a.labels.mean() <= 0.12 and {k for _, _, k in a.kinds} <= {"interference", "kv_leak", "stall",
                                                                              "overload"}
    for s, e, _ in a.kinds:
        assert a.labels[s:e].all()
    # a fault's aftermath follows a fault directly, never overlaps one, and only lasts while its backlog drains
    assert a.aftermath.any() and not (a.aftermath & a.labels).any()
    starts = np.flatnonzero(np.diff(np.concatenate([[0], a.aftermath])) == 1)
    assert all(a.labels[i - 1] for i in starts)


def test_aftermath_steps_are_not_scored_unless_asked():
    t = synthetic_trace(600, seed=3)
    hit = t.labels.copy()
    both = hit | t.aftermath
    assert evaluate_detector(both, t)["precision"] == evaluate_detector(hit, t)["precision"] == 1.0
    strict = evaluate_detector(both, t, aftermath="normal")
    assert strict["precision"] == pytest.approx(t.labels.sum() / both.sum()) and strict["precision"] < 1
    with pytest.raises(ConfigError, match="aftermath"):
        evaluate_detector(hit, t, aftermath="drop")


def test_vae_detector_beats_the_rules_on_held_out_traces():
    torch.set_num_threads(1)  # a tiny MLP: one thread is fastest
    train, test = synthetic_trace(2000, seed=0), synthetic_trace(2000, seed=1)
    vae = VAEDetector().fit(train, semi_supervised_labels(train, 0.2, seed=0))
    r_vae = evaluate_detector(vae.predict(test), test)
    r_rules = evaluate_detector(RuleDetector().fit(train).predict(test), test)
    assert r_vae["precision"] >= 0.9 and r_vae["recall"] >= 0.9  # the goal, on this pair of traces
    assert r_vae["event_recall"] == 1.0  # it finds every injected fault
    assert r_vae["f1"] > r_rules["f1"] + 0.5
    assert len(vae.models) == 3 and vae.predict(test).tolist() == (vae.score(test) > 1).astype(int).tolist()


# -- autoscaling ----------------------------------------------------------------------------------
from llmdeploy.deploy.autoscale import ENOVAPolicy, ENOVARules, Static, arrivals, simulate  # noqa: E402

PROFILE = Profile(weight_bytes=540_000_000, kv_bytes_per_token=46080, prefill_s_per_token=6e-4, decode_a=0.04,
                  decode_c=0.004, max_model_len=8192)
LOAD = Workload(request_rate=6.0, prompt_tokens=128, output_tokens=64, ttft_slo=2.0, tpot_slo=0.1)


def test_arrivals_and_simulation_are_replayable():
    a = arrivals("bursty", 1200, 3.0, seed=1)
    assert np.array_equal(a, arrivals("bursty", 1200, 3.0, seed=1)) and np.all(np.diff(a) >= 0)
    assert abs(len(arrivals("poisson", 2000, 3.0, seed=2)) / 2000 - 3.0) < 0.2
    r1 = simulate(a, Static(2), PROFILE, LOAD, max_batch=8, initial_replicas=2)
    r2 = simulate(a, Static(2), PROFILE, LOAD, max_batch=8, initial_replicas=2)
    assert np.array_equal(r1.ttft, r2.ttft) and r1.replica_seconds == r2.replica_seconds
    assert len(r1.ttft) == len(a)  # every request served
    big = simulate(a, Static(50), PROFILE, LOAD, max_batch=8, initial_replicas=50)
    assert np.allclose(big.ttft, 128 * 6e-4)  # never waits: TTFT is the prefill
    assert big.replica_seconds == pytest.approx(50 * big.timeline[-1].time, rel=0.02)


def test_enova_rules_scale_up_only_after_sustained_waiting():
    rules = ENOVARules(max_batch=8)
    obs = dict(time=0.0, replicas=2, serving=2, arrivals_per_s=5.0, running=16, kv_usage=0.9, p95_ttft_s=5.0)
    from llmdeploy.deploy.autoscale import Observation

    decisions = [rules(Observation(**obs, waiting=60)) for _ in range(18)]
    assert decisions[:17] == [2] * 17 and decisions[17] == 3  # 18 intervals of 10 s = 3 minutes
    assert rules(Observation(**{**obs, "running": 1, "kv_usage": 0.05}, waiting=0)) == 1


def test_enova_policy_meets_the_slo_with_fewer_replica_seconds_than_static():
    times = arrivals("diurnal", 3600, LOAD.request_rate, seed=0)
    rec = recommend(PROFILE, LOAD, 4 * 2**30)
    static = None
    for n in range(1, 40):  # the cheapest static allocation that meets the SLO
        r = simulate(times, Static(n), PROFILE, LOAD, max_batch=rec.max_batch, initial_replicas=n)
        if r.attainment >= 0.95:
            static = r
            break
    enova = simulate(times, ENOVAPolicy(PROFILE, LOAD, 4 * 2**30), PROFILE, LOAD, max_batch=rec.max_batch)
    assert static is not None and enova.attainment >= 0.95
    assert enova.replica_seconds < static.replica_seconds


def test_docs_quote_the_anomaly_benchmark():
    """The detector figures in docs/index.md are those of benchmarks/results/deploy/anomaly.json."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    res = json.loads((root / "benchmarks/results/deploy/anomaly.json").read_text())
    doc = " ".join((root / "docs/index.md").read_text().split())
    s, n = res["summary"], len(res["pairs"])
    assert (f"precision {s['vae']['precision']['mean']:.3f} (min {s['vae']['precision']['min']:.3f}), "
            f"recall {s['vae']['recall']['mean']:.3f} (min {s['vae']['recall']['min']:.3f}), every injected fault found") in doc
    assert s["vae"]["event_recall"]["min"] == 1.0
    assert f"holds on {s['goal_met_pairs']} of {n} train × test pairs" in doc
    assert s["goal_met_pairs"] == sum(p["vae"]["precision"] >= 0.9 and p["vae"]["recall"] >= 0.9 for p in res["pairs"])
    assert f"Counting the aftermath as normal, precision is {s['vae_strict']['precision']['mean']:.3f}" in doc
    assert f"(recall {s['rules']['recall']['mean']:.3f})" in doc


def test_scaling_down_drains_replicas_and_loses_no_request():
    from llmdeploy.deploy.autoscale import Observation

    class Down:  # three replicas, then one
        def __call__(self, obs: Observation) -> int:
            return 1

    times = arrivals("poisson", 300, 4.0, seed=5)
    r = simulate(times, Down(), PROFILE, LOAD, max_batch=8, initial_replicas=3, interval_s=10)
    assert len(r.ttft) == len(times)  # every request served, none dropped by the scale-down
    assert all(o.replicas == 1 for o in r.timeline[1:])  # the policy's view: one replica asked for
    end = r.timeline[-1].time
    assert r.replica_seconds > end  # the drained replicas were billed until their last request ended
    assert r.replica_seconds < 3 * end


def test_enova_policy_reacts_to_a_burst_within_an_interval_but_not_to_noise():
    from llmdeploy.deploy.autoscale import Observation

    policy = ENOVAPolicy(PROFILE, LOAD, 4 * 2**30, interval_s=10.0)
    rng = np.random.default_rng(0)
    base = dict(time=0.0, serving=3, running=10, kv_usage=0.3, p95_ttft_s=0.1, waiting=0)
    steady = [policy(Observation(**base, replicas=3, arrivals_per_s=rng.poisson(60) / 10)) for _ in range(30)]
    assert max(steady) - min(steady) <= 1  # Poisson noise barely moves it
    burst = policy(Observation(**base, replicas=steady[-1], arrivals_per_s=24.0))
    need = recommend(PROFILE, Workload(request_rate=24.0, prompt_tokens=128, output_tokens=64, ttft_slo=2.0,
                                       tpot_slo=0.1), 4 * 2**30, target_utilization=1.0).replicas
    assert burst >= need > steady[-1]  # the new rate at once, not a moving average of it
    calm = Observation(**base, replicas=burst, arrivals_per_s=6.0)
    down = [policy(calm) for _ in range(policy.hold)]
    assert down[:-1] == [burst] * (policy.hold - 1) and down[-1] < burst  # down only after `hold` intervals


def test_docs_quote_the_autoscale_benchmark():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    res = json.loads((root / "benchmarks/results/autoscale/autoscale.json").read_text())
    doc = " ".join((root / "docs/index.md").read_text().split())
    g, seeds = res["goal"], res["meta"]["seeds"]

    def span(kind: str) -> str:
        v = [g[f"measured/{kind}/{s}"]["cost_vs_cheapest_static"] for s in seeds]
        return f"{min(v):.2f}–{max(v):.2f}"

    def met(kind: str, scenario: str = "measured") -> int:
        return sum(g[f"{scenario}/{kind}/{s}"]["meets_slo"] for s in seeds)

    assert f"measured cold start ({res['meta']['startup_s']['measured']:.1f} s)" in doc
    assert (f"costs {span('diurnal')} of its replica-seconds on the diurnal traces (meeting the SLO on "
            f"{met('diurnal')} of 3) and {span('bursty')} on the bursty ones (meeting it on {met('bursty')} of 3)") in doc
    assert f"it costs {span('poisson')}×" in doc
    assert f"With 30 s cold starts it meets the SLO on {met('bursty', '30 s')} of the 3 bursty traces" in doc
    assert len(seeds) == 3 and all(g[k]["cost_vs_cheapest_static"] > 0 for k in g)


def test_the_detector_keeps_the_score_order_when_scores_are_negative():
    """Members' scores are divided by their thresholds: a negative ELBO (possible with small learned
    variances) must not flip the order — one member's scores minus 100 flag the same steps (with
    several members the shift changes their weights in the average, not the order of one's)."""
    torch.set_num_threads(1)

    class Shifted(VAEDetector):
        def _score(self, model, x):
            return super()._score(model, x) - 100.0

    t, test = synthetic_trace(600, seed=7), synthetic_trace(600, seed=8)
    labels = semi_supervised_labels(t, 0.2, seed=7)
    plain = VAEDetector(epochs=40, members=1).fit(t, labels)
    shifted = Shifted(epochs=40, members=1).fit(t, labels)
    assert all(o == 0 for o in plain.offsets) and all(o > 0 for o in shifted.offsets)
    assert np.array_equal(plain.predict(test), shifted.predict(test)) and plain.predict(test).any()


def test_the_detector_threshold_is_the_tail_of_normal_scores():
    """POT: a generalised Pareto tail fitted to the excesses of normal scores gives the score that a
    normal step exceeds with probability ``risk`` — for exponential scores, -ln(risk)."""
    rng = np.random.default_rng(0)
    scores = rng.exponential(1.0, 20000)
    det = VAEDetector(risk=1e-3)
    assert det._threshold(scores) == pytest.approx(-np.log(1e-3), rel=0.1)
    assert det._threshold(scores + 5.0) == pytest.approx(det._threshold(scores) + 5.0)
    assert (scores > det._threshold(scores)).mean() == pytest.approx(1e-3, abs=6e-4)
    assert VAEDetector(quantile=0.99)._threshold(scores) == pytest.approx(np.quantile(scores, 0.99))
    with pytest.raises(ConfigError, match="risk"):
        VAEDetector(risk=0.5)
