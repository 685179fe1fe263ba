"""Autoscaling policies and a replayable discrete-event simulator of a replicated server.

:func:`arrivals` draws seeded request arrival times (``"poisson"``, ``"bursty"``: a baseline
with bursts of several times the rate, ``"diurnal"``: a sinusoidal day compressed into the
trace). :func:`simulate` replays them against replicas that each run up to ``max_batch``
requests at once, with service times from a measured :class:`~llmdeploy.deploy.Profile`
(prefill of the prompt, then one decode step per output token at the batch size the replica has
when the request starts); requests wait in one FIFO queue in front of the replicas; a new
replica serves after ``startup_s`` (cold start) and counts from the moment it is asked for. Every
``interval_s`` the policy sees the last interval's metrics (arrivals, waiting and running
requests, KV usage, p95 time to first token) and sets the number of replicas.

Policies:

* :class:`Static` — a fixed number of replicas.
* :class:`ENOVARules` — the rules of ENOVA's open code: one more replica when waiting requests
  stayed ≥ ``waiting`` (50) for ``sustain_s`` (3 minutes); one fewer when KV usage ≤ 10 % and
  running requests ≤ 10 % of the capacity.
* :class:`ENOVAPolicy` — ENOVA's configuration recommendation in the loop: each interval, the
  replicas :func:`~llmdeploy.deploy.recommend` gives for the observed arrival rate (an
  exponentially weighted average, rising fast and falling slowly), plus one at once when the
  interval's p95 TTFT broke the SLO (the detection trigger; the VAE detector is not in this loop).

:func:`SimResult` reports SLO attainment (share of requests whose TTFT meets the SLO), p95 TTFT
and replica-seconds (the cost).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError
from .recommend import Profile, Workload, recommend


def arrivals(kind: str, duration_s: float, mean_rps: float, seed: int = 0) -> np.ndarray:
    """Sorted arrival times (seconds) of a seeded non-homogeneous Poisson process."""
    rng = np.random.default_rng(seed)
    t = np.arange(0.0, duration_s, 1.0)
    if kind == "poisson":
        rate = np.full_like(t, mean_rps)
    elif kind == "diurnal":
        rate = mean_rps * (1 + 0.8 * np.sin(2 * np.pi * t / duration_s - np.pi / 2))
    elif kind == "bursty":
        rate = np.full_like(t, 0.6 * mean_rps)
        for start in rng.choice(len(t), size=max(1, int(duration_s // 600)), replace=False):
            rate[start:start + int(rng.integers(60, 180))] *= rng.uniform(3, 5)
    else:
        raise ConfigError(f"arrival pattern must be poisson, diurnal or bursty, got {kind!r}")
    counts = rng.poisson(rate)
    return np.sort(np.concatenate([s + rng.random(c) for s, c in zip(t, counts)]))


@dataclass
class Observation:
    time: float
    replicas: int  # asked for (serving or starting)
    serving: int
    arrivals_per_s: float
    waiting: int
    running: int
    kv_usage: float
    p95_ttft_s: float


class Static:
    def __init__(self, replicas: int) -> None:
        self.replicas = replicas

    def __call__(self, obs: Observation) -> int:
        return self.replicas


class ENOVARules:
    def __init__(self, *, max_batch: int, waiting: int = 50, sustain_s: float = 180, kv_low: float = 0.1,
                 running_low: float = 0.1, min_replicas: int = 1, interval_s: float = 10) -> None:
        self.max_batch, self.waiting, self.sustain = max_batch, waiting, sustain_s
        self.kv_low, self.running_low, self.min = kv_low, running_low, min_replicas
        self.interval = interval_s
        self._high = 0.0

    def __call__(self, obs: Observation) -> int:
        self._high = self._high + self.interval if obs.waiting >= self.waiting else 0.0
        if self._high >= self.sustain:
            self._high = 0.0
            return obs.replicas + 1
        if obs.kv_usage <= self.kv_low and obs.running <= self.running_low * self.max_batch * obs.serving:
            return max(self.min, obs.replicas - 1)
        return obs.replicas


class ENOVAPolicy:
    def __init__(self, profile: Profile, workload: Workload, memory_bytes: int, *, min_replicas: int = 1,
                 rise: float = 0.6, fall: float = 0.05, **recommend_options) -> None:
        self.profile, self.workload, self.memory = profile, workload, memory_bytes
        self.min, self.rise, self.fall, self.options = min_replicas, rise, fall, recommend_options
        self.rate: float | None = None

    def __call__(self, obs: Observation) -> int:
        r = obs.arrivals_per_s
        if self.rate is None:
            self.rate = r
        else:
            a = self.rise if r > self.rate else self.fall
            self.rate += a * (r - self.rate)
        load = Workload(request_rate=max(self.rate, 1e-6), prompt_tokens=self.workload.prompt_tokens,
                        output_tokens=self.workload.output_tokens, ttft_slo=self.workload.ttft_slo,
                        tpot_slo=self.workload.tpot_slo)
        target = recommend(self.profile, load, self.memory, **self.options).replicas
        if obs.p95_ttft_s > self.workload.ttft_slo:  # the SLO broke this interval: act now
            target = max(target, obs.replicas + 1)
        return max(self.min, target)


@dataclass
class SimResult:
    ttft: np.ndarray
    replica_seconds: float
    timeline: list[Observation] = field(default_factory=list)
    slo: float = 0.0

    @property
    def attainment(self) -> float:
        return float((self.ttft <= self.slo).mean()) if len(self.ttft) else 1.0

    @property
    def p95_ttft(self) -> float:
        return float(np.quantile(self.ttft, 0.95)) if len(self.ttft) else 0.0

    def summary(self) -> dict:
        return {"requests": int(len(self.ttft)), "slo_attainment": self.attainment, "p95_ttft_s": self.p95_ttft,
                "replica_seconds": self.replica_seconds,
                "max_replicas": max((o.replicas for o in self.timeline), default=0)}


def simulate(times: np.ndarray, policy, profile: Profile, workload: Workload, *, max_batch: int,
             kv_blocks: int | None = None, block_size: int = 16, initial_replicas: int = 1, startup_s: float = 30.0,
             interval_s: float = 10.0) -> SimResult:
    """Replay ``times`` (see the module docstring). ``kv_blocks`` only scales the KV-usage metric
    (default: exactly ``max_batch`` full requests)."""
    n_in, n_out = workload.prompt_tokens, workload.output_tokens
    per_request = math.ceil((n_in + n_out) / block_size)
    kv_blocks = kv_blocks or max_batch * per_request
    prefill = n_in * profile.prefill_s_per_token
    end = float(times[-1]) if len(times) else 0.0
    events: list[tuple[float, int, str, int]] = []  # (time, order, kind, payload)
    order = 0

    def push(t: float, kind: str, payload: int = 0) -> None:
        nonlocal order
        heapq.heappush(events, (t, order, kind, payload))
        order += 1

    for i, t in enumerate(times):
        push(float(t), "arrive", i)
    push(interval_s, "tick")
    ready = [0.0] * initial_replicas  # when each replica (index) can serve; inf: retired
    busy = [0] * initial_replicas
    queue: deque[int] = deque()
    ttft = np.full(len(times), np.nan)
    window_ttft: list[float] = []
    window_arrivals = 0
    cost, last_t = 0.0, 0.0
    timeline: list[Observation] = []

    def live(now: float) -> list[int]:
        return [i for i, r in enumerate(ready) if r <= now]

    def asked() -> int:
        return sum(1 for r in ready if r != math.inf)

    def dispatch(now: float) -> None:
        while queue:
            free = [i for i in live(now) if busy[i] < max_batch]
            if not free:
                return
            rep = min(free, key=lambda i: busy[i])
            req = queue.popleft()
            busy[rep] += 1
            ttft[req] = now - times[req] + prefill
            window_ttft.append(ttft[req])
            push(now + prefill + n_out * profile.decode_step(busy[rep]), "done", rep)

    while events:
        now, _, kind, payload = heapq.heappop(events)
        cost += asked() * (now - last_t)
        last_t = now
        if kind == "arrive":
            queue.append(payload)
            window_arrivals += 1
        elif kind == "done":
            busy[payload] -= 1
        elif kind == "ready":
            pass
        elif kind == "tick":
            serving = len(live(now))
            obs = Observation(now, asked(), serving, window_arrivals / interval_s, len(queue), sum(busy),
                              sum(busy) * per_request / max(1, kv_blocks * max(1, serving)),
                              float(np.quantile(window_ttft, 0.95)) if window_ttft else 0.0)
            timeline.append(obs)
            window_ttft, window_arrivals = [], 0
            want = max(1, int(policy(obs)))
            while asked() < want:
                ready.append(now + startup_s)
                busy.append(0)
                push(now + startup_s, "ready")
            while asked() > want:  # retire an idle replica, the newest first (a starting one if any)
                idle = [i for i, r in enumerate(ready) if r != math.inf and busy[i] == 0]
                if not idle:
                    break
                ready[max(idle, key=lambda i: ready[i])] = math.inf
            if now < end or queue or any(busy):
                push(now + interval_s, "tick")
        dispatch(now)
    return SimResult(ttft=ttft[~np.isnan(ttft)], replica_seconds=cost, timeline=timeline, slo=workload.ttft_slo)
