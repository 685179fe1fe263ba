"""Autoscaling policies and a replayable discrete-event simulator of a replicated server.

:func:`arrivals` draws seeded request arrival times (``"poisson"``, ``"bursty"``: a baseline
with bursts of several times the rate, ``"diurnal"``: a sinusoidal day compressed into the
trace). :func:`simulate` replays them against replicas that each run up to ``max_batch``
requests at once, with service times from a measured :class:`~llmdeploy.deploy.Profile`
(prefill of the prompt, then one decode step per output token at the batch size the replica has
when the request starts); requests wait in one FIFO queue in front of the replicas; a new
replica serves after ``startup_s`` (cold start) and counts from the moment it is asked for; a
replica asked to stop takes no new request and is released (stops counting) when its last one
ends — a graceful drain, as Ray Serve and Kubernetes do; one still starting is cancelled at once. Every
``interval_s`` the policy sees the last interval's metrics (arrivals, waiting and running
requests, KV usage, p95 time to first token) and sets the number of replicas.

Policies:

* :class:`Static` — a fixed number of replicas.
* :class:`ENOVARules` — the rules of ENOVA's open code: one more replica when waiting requests
  stayed ≥ ``waiting`` (50) for ``sustain_s`` (3 minutes); one fewer when KV usage ≤ 10 % and
  running requests ≤ 10 % of the capacity.
* :class:`ENOVAPolicy` — ENOVA's two modules in the loop: detection decides *when* the load
  changed, the configuration recommender *how many* replicas the new load needs. Every
  ``interval_s`` (5 s) it reads the last interval; the arrival rate is the mean over the last
  ``window_s`` (2 minutes), forgotten at once when an interval's count departs from it by more than
  ``z`` (3) Poisson standard deviations (a rate change, not noise: the policy follows a burst
  within one interval and is not moved by sampling noise); waiting requests add
  ``waiting / drain_s`` to the rate (the backlog cleared in ``drain_s``); the rate's jumps beyond
  Poisson noise over the last ``history_s`` (30 minutes; root mean square of the change between
  intervals, less what Poisson noise explains — 2λ/Δ — with 3 standard errors of margin) add
  ``headroom`` (3) of themselves — spare capacity only where the load has shown bursts, none for a
  steady load; :func:`recommend` (at ``target_utilization`` 1.0: its M/M/c p95-TTFT check keeps
  the margin) turns the result into replicas. It scales up at once (and by one more when the
  interval's p95 TTFT broke the SLO), down only after ``hold_s`` (1 minute) of asking for fewer.
  ENOVA's paper names the two modules, not this arithmetic: the rate test, the drain term, the
  jump headroom and the hold are ours; their settings were chosen on the benchmark's traces
  (``benchmarks/autoscale.py``).

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
                 interval_s: float = 5.0, window_s: float = 120.0, z: float = 3.0, drain_s: float = 30.0,
                 headroom: float = 3.0, history_s: float = 1800.0, hold_s: float = 60.0,
                 target_utilization: float = 1.0, **recommend_options) -> None:
        if interval_s <= 0 or drain_s <= 0 or min(window_s, hold_s) < interval_s or history_s < 3 * interval_s:
            raise ConfigError("need interval_s > 0, drain_s > 0, window_s and hold_s >= interval_s, "
                              "history_s >= 3 intervals")
        self.profile, self.workload, self.memory = profile, workload, memory_bytes
        self.min, self.interval, self.z, self.drain, self.headroom = min_replicas, interval_s, z, drain_s, headroom
        self.hold = max(1, round(hold_s / interval_s))
        self.utilization, self.options = target_utilization, recommend_options
        # arrivals per interval since the last rate change; arrivals per second of each interval
        self.counts: deque[float] = deque(maxlen=max(1, round(window_s / interval_s)))
        self.rates: deque[float] = deque(maxlen=max(3, round(history_s / interval_s)))
        self.lower = 0  # intervals in a row that asked for fewer replicas

    def rate(self, obs: Observation) -> float:
        """The arrival rate the replicas must serve (see the module docstring)."""
        n = obs.arrivals_per_s * self.interval
        if self.counts:
            mean = sum(self.counts) / len(self.counts)
            if abs(n - mean) > self.z * math.sqrt(max(mean, 1.0)):  # the rate changed: forget the old level
                self.counts.clear()
        self.counts.append(n)
        self.rates.append(obs.arrivals_per_s)
        rate = sum(self.counts) / len(self.counts) / self.interval + obs.waiting / self.drain
        if len(self.rates) > 2:
            r = np.asarray(self.rates)
            d2 = np.diff(r) ** 2
            # Poisson noise alone gives E[d²] = 2λ/Δ; count only what exceeds it by 3 standard errors
            noise = 2 * float(r.mean()) / self.interval * (1 + 3 * math.sqrt(2 / len(d2)))
            rate += self.headroom * math.sqrt(max(float(d2.mean()) - noise, 0.0))
        return rate

    def __call__(self, obs: Observation) -> int:
        load = Workload(request_rate=max(self.rate(obs), 1e-6), prompt_tokens=self.workload.prompt_tokens,
                        output_tokens=self.workload.output_tokens, ttft_slo=self.workload.ttft_slo,
                        tpot_slo=self.workload.tpot_slo)
        target = recommend(self.profile, load, self.memory, target_utilization=self.utilization,
                           **self.options).replicas
        if obs.p95_ttft_s > self.workload.ttft_slo:  # the SLO broke this interval: act now
            target = max(target, obs.replicas + 1)
        target = max(self.min, target)
        if target < obs.replicas:
            self.lower += 1
            if self.lower < self.hold:
                return obs.replicas
        self.lower = 0
        return target


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
    ready = [0.0] * initial_replicas  # when each replica (index) can serve; inf: released
    busy = [0] * initial_replicas
    draining: set[int] = set()  # asked to stop: no new requests, released when its last one ends
    queue: deque[int] = deque()
    ttft = np.full(len(times), np.nan)
    window_ttft: list[float] = []
    window_arrivals = 0
    cost, last_t = 0.0, 0.0
    timeline: list[Observation] = []

    def live(now: float) -> list[int]:
        return [i for i, r in enumerate(ready) if r <= now and i not in draining]

    def billed() -> int:
        return sum(1 for r in ready if r != math.inf)

    def asked() -> int:
        return billed() - len(draining)

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
        cost += billed() * (now - last_t)
        last_t = now
        if kind == "arrive":
            queue.append(payload)
            window_arrivals += 1
        elif kind == "done":
            busy[payload] -= 1
            if payload in draining and busy[payload] == 0:
                draining.discard(payload)
                ready[payload] = math.inf
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
                if draining:  # take back a draining replica before starting a new one
                    draining.discard(max(draining, key=lambda i: busy[i]))
                    continue
                ready.append(now + startup_s)
                busy.append(0)
                push(now + startup_s, "ready")
            while asked() > want:
                # cancel a replica still starting (the newest first), else drain the least busy one
                candidates = [i for i, r in enumerate(ready) if r != math.inf and i not in draining]
                starting = [i for i in candidates if ready[i] > now]
                if starting:
                    ready[max(starting, key=lambda i: ready[i])] = math.inf
                    continue
                rep = min(candidates, key=lambda i: busy[i])
                if busy[rep]:
                    draining.add(rep)
                else:
                    ready[rep] = math.inf
            if now < end or queue or any(busy):
                push(now + interval_s, "tick")
        dispatch(now)
    return SimResult(ttft=ttft[~np.isnan(ttft)], replica_seconds=cost, timeline=timeline, slo=workload.ttft_slo)
