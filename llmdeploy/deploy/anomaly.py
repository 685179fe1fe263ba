"""Anomaly detection over serving metrics (ENOVA's performance detection): seeded traces with
injected anomalies, ENOVA's rule set, a semi-supervised VAE, and their precision/recall.

A trace is a (steps, features) array of the server's metrics sampled every ``interval`` seconds
— :data:`FEATURES`: request rate, running and waiting requests, KV usage, p95 time to first
token, generated tokens/s, the quantities ``llmdeploy serve`` exports at ``/metrics`` — with a
0/1 label per step. :func:`synthetic_trace` draws one from a queueing model of one replica under
diurnal load with bursts, and injects labelled segments of four kinds: ``interference`` (a
co-located job: latency ×3, throughput ÷3 at the same load), ``kv_leak`` (KV usage climbing with
no more requests), ``stall`` (generation stops, requests pile up), ``overload`` (arrivals far
beyond capacity). A fault that piles up a backlog leaves the server degraded after it ends, until
the backlog drains: those steps are the trace's ``aftermath`` — neither the fault (label 0) nor
normal operation.

Detectors (``fit(trace, labels)`` then ``predict(trace) -> 0/1 per step``):

* :class:`RuleDetector` — the rules of ENOVA's open code: scale up when waiting requests stay
  ≥ 50 for 3 minutes; scale down when KV usage ≤ 10 % and running requests ≤ 0.1·max_num_seqs.
  A step is anomalous when either fires.
* :class:`VAEDetector` — the paper's semi-supervised VAE (small): an MLP VAE over sliding windows
  (the step and the 2 before it) of the log-scaled, standardised metrics, trained by the ELBO on
  the unlabelled and normal windows — after the first quarter of the epochs, the ``trim`` fraction
  (10 %) of them that fit worst sit each epoch out, since unlabelled data hide anomalies — while
  the few windows labelled anomalous are pushed above a reconstruction-error margin (the
  semi-supervised part). A step's score is the negative ELBO at the posterior mean with the
  reconstruction term of the step's own metrics only (the earlier steps are context: scoring the
  whole window flagged the two steps after every fault), plus ``residual_weight`` (3) times the
  step's largest standardised squared residual — a fault that shows in one metric (KV usage
  climbing, latency tripling) stands out there even when the others fit, which the summed ELBO
  dilutes; without it, a detector whose few labels held no such fault missed up to a fifth of their
  steps (weight chosen on traces of seeds 0–7, not the benchmark's test traces). Threshold: peaks
  over threshold (POT, as in SPOT, Siffer et al., KDD 2017) on the scores of steps labelled normal
  (of all steps when none is) — a generalised Pareto tail fitted by moments to their excesses over
  the ``tail_quantile`` (0.8), read where a normal step is flagged with probability ``risk`` (1e-3).
  Empirical quantiles did worse: with a few hundred labelled steps the 0.998 quantile is about the
  second-highest score and moved with the labels drawn (0.9/0.9 on 53 of 64 train × validation
  pairs, against 62 with POT), and the 0.98 quantile flagged many normal steps (precision 0.794 on
  average); chosen on train seeds 0–15 × validation seeds 200–203, not the benchmark's test
  traces (``benchmarks/anomaly.py`` regenerates that comparison in ANOMALY.md). ``quantile=`` uses
  the empirical quantile instead. ``members`` VAEs of different seeds
  (3) average their scores, each divided by its own threshold, and a step is flagged above 1: one
  small VAE's result varies with its seed (recall 0.72–0.92 on one trace over three seeds), the
  average of three much less. The paper gives no architecture; this one is ours and documented here.

:func:`evaluate_detector` reports point-wise precision and recall, and event-level recall
(segments with at least one flagged step). Steps of a fault's aftermath (see above) count neither
way by default — flagging a server that is still working off a fault's backlog is not a false
alarm, and missing it is not a missed fault; ``aftermath="normal"`` scores them as normal steps
(the strict reading).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError

FEATURES = ("request_rate", "running", "waiting", "kv_usage", "ttft_p95_s", "generation_tokens_per_s")
KINDS = ("interference", "kv_leak", "stall", "overload")


@dataclass
class Trace:
    values: np.ndarray  # (steps, len(FEATURES))
    labels: np.ndarray  # (steps,) 0/1
    kinds: list[tuple[int, int, str]]  # injected segments [start, end)
    interval: float = 10.0
    max_num_seqs: int = 16
    aftermath: np.ndarray | None = None  # (steps,) 0/1: a fault's backlog still draining


def synthetic_trace(steps: int = 2000, seed: int = 0, *, anomaly_fraction: float = 0.08, interval: float = 10.0,
                    max_num_seqs: int = 16, capacity_rps: float = 4.0, output_tokens: float = 64.0,
                    prefill_s: float = 0.3) -> Trace:
    """A seeded metrics trace of one replica (see the module docstring)."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    period = 8640 / interval / 10  # a compressed "day" of 864 s-steps: ten per 2.4 h of steps
    rate = capacity_rps * (0.45 + 0.25 * np.sin(2 * np.pi * t / period))
    rate *= np.exp(rng.normal(0, 0.08, steps))
    for start in rng.choice(steps, size=max(1, steps // 300), replace=False):  # normal short bursts
        rate[start:start + rng.integers(2, 5)] *= 1.3
    labels = np.zeros(steps, dtype=np.int64)
    kinds: list[tuple[int, int, str]] = []
    budget, guard = int(anomaly_fraction * steps), 0
    while labels.sum() < budget and guard < 1000:
        guard += 1
        length = int(rng.integers(6, 21))
        start = int(rng.integers(20, steps - length - 1))
        if labels[max(0, start - 10):start + length + 10].any():
            continue
        labels[start:start + length] = 1
        kinds.append((start, start + length, KINDS[len(kinds) % len(KINDS)]))
    slow = np.ones(steps)
    leak = np.zeros(steps)
    stall = np.zeros(steps, dtype=bool)
    for s, e, kind in kinds:
        if kind == "interference":
            slow[s:e] = 3.0
        elif kind == "kv_leak":
            leak[s:e] = np.linspace(0.2, 0.7, e - s)
        elif kind == "stall":
            stall[s:e] = True
        elif kind == "overload":
            rate[s:e] = capacity_rps * rng.uniform(1.8, 2.5)
    cap = capacity_rps / slow
    cap[stall] = 0.05 * capacity_rps
    rho = rate / cap
    waiting = np.zeros(steps)
    aftermath = np.zeros(steps, dtype=np.int64)
    q = 0.0
    for i in range(steps):  # a fluid queue: excess arrivals wait, spare capacity drains them
        q = max(0.0, q + (rate[i] - cap[i]) * interval)
        waiting[i] = q + (rho[i] ** 2 / max(1e-3, 1 - min(rho[i], 0.95))) * rng.uniform(0.5, 1.5)
        if q > 0 and not labels[i] and i and (labels[i - 1] or aftermath[i - 1]):
            aftermath[i] = 1  # the backlog a fault left is still draining
    # requests in flight: each holds a slot for max_num_seqs / capacity seconds (Little's law)
    running = (max_num_seqs * np.minimum(rho, 1.0) + rng.normal(0, 0.3, steps)).clip(0, max_num_seqs)
    running[stall] = max_num_seqs
    kv = (running / max_num_seqs) * 0.6 + leak + rng.normal(0, 0.02, steps)
    ttft = slow * prefill_s * (1 + rng.normal(0, 0.05, steps)) + waiting / np.maximum(cap, 1e-3)
    tokens = np.minimum(rate, cap) * output_tokens * (1 + rng.normal(0, 0.05, steps))
    values = np.stack([rate, running, waiting, kv.clip(0, 1), ttft, tokens], axis=1).astype(np.float64)
    return Trace(values, labels, kinds, interval, max_num_seqs, aftermath)


class RuleDetector:
    """ENOVA's open-code rules (see the module docstring); ``fit`` learns nothing."""

    def __init__(self, waiting: float = 50, sustain_s: float = 180, kv_low: float = 0.1, running_low: float = 0.1,
                 max_num_seqs: int = 16, interval: float = 10.0) -> None:
        self.waiting, self.sustain, self.kv_low, self.running_low = waiting, sustain_s, kv_low, running_low
        self.max_num_seqs, self.interval = max_num_seqs, interval

    def fit(self, trace: Trace, labels: np.ndarray | None = None) -> RuleDetector:
        self.max_num_seqs, self.interval = trace.max_num_seqs, trace.interval
        return self

    def predict(self, trace: Trace) -> np.ndarray:
        v = trace.values
        high = v[:, FEATURES.index("waiting")] >= self.waiting
        need = max(1, int(round(self.sustain / self.interval)))
        run = np.zeros(len(v), dtype=np.int64)
        for i in range(len(v)):
            run[i] = run[i - 1] + 1 if high[i] and i else int(high[i])
        up = run >= need
        down = (v[:, FEATURES.index("kv_usage")] <= self.kv_low) & \
            (v[:, FEATURES.index("running")] <= self.running_low * self.max_num_seqs)
        return (up | down).astype(np.int64)


class _VAE(nn.Module):
    def __init__(self, dim: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden // 2), nn.Tanh(),
                                 nn.Linear(hidden // 2, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent, hidden // 2), nn.Tanh(), nn.Linear(hidden // 2, hidden), nn.Tanh(),
                                 nn.Linear(hidden, dim))
        self.log_var = nn.Parameter(torch.zeros(dim))

    def neg_elbo(self, x: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(negative ELBO per window, squared reconstruction error per window)."""
        mu, logv = self.enc(x).chunk(2, -1)
        z = mu + torch.randn_like(mu) * (0.5 * logv).exp() if sample else mu
        rec = self.dec(z)
        err = (x - rec) ** 2
        nll = 0.5 * (err / self.log_var.exp() + self.log_var + math.log(2 * math.pi)).sum(-1)
        kl = 0.5 * (mu ** 2 + logv.exp() - logv - 1).sum(-1)
        return nll + kl, err.sum(-1)


class VAEDetector:
    """The semi-supervised VAE detector (see the module docstring)."""

    def __init__(self, window: int = 3, hidden: int = 64, latent: int = 4, epochs: int = 400, lr: float = 3e-3,
                 margin: float = 10.0, trim: float = 0.1, risk: float = 1e-3, tail_quantile: float = 0.8,
                 quantile: float | None = None, members: int = 3, residual_weight: float = 3.0,
                 seed: int = 0) -> None:
        if members < 1 or window < 1:
            raise ConfigError(f"members and window must be >= 1, got {members} and {window}")
        if not 0 < risk < 1 - tail_quantile or not 0 < tail_quantile < 1:
            raise ConfigError(f"need 0 < tail_quantile < 1 and 0 < risk < 1 - tail_quantile, got {tail_quantile} "
                              f"and {risk}")
        self.risk, self.tail_quantile = risk, tail_quantile
        self.window, self.hidden, self.latent, self.epochs, self.lr = window, hidden, latent, epochs, lr
        self.margin, self.trim, self.quantile, self.members, self.seed = margin, trim, quantile, members, seed
        self.residual_weight = residual_weight

    def _windows(self, trace: Trace) -> torch.Tensor:
        v = np.log1p(np.maximum(trace.values, 0))  # rates, queues and latencies are heavy-tailed
        v = (v - self.mean) / self.std
        pad = np.concatenate([np.repeat(v[:1], self.window - 1, 0), v])
        w = np.lib.stride_tricks.sliding_window_view(pad, self.window, axis=0)  # (steps, F, window)
        return torch.tensor(w.reshape(len(v), -1), dtype=torch.float32)

    def fit(self, trace: Trace, labels: np.ndarray | None = None) -> VAEDetector:
        """``labels``: 1 anomalous, 0 normal, -1 unknown per step (None: all unknown)."""
        labels = np.full(len(trace.values), -1) if labels is None else np.asarray(labels)
        logv = np.log1p(np.maximum(trace.values, 0))
        ref = logv[labels != 1]
        self.mean, self.std = ref.mean(0), ref.std(0) + 1e-6
        x = self._windows(trace)
        self.models, self.thresholds, self.offsets = [], [], []
        for k in range(self.members):
            model = self._train(x, torch.tensor(labels == 1), self.seed + k)
            scores = self._score(model, x)
            normal = scores[labels == 0] if (labels == 0).any() else scores[labels == -1]
            # a negative ELBO can be below zero: shift so that normal scores are >= 0 before the
            # division by the threshold keeps the order (no shift when they already are)
            offset = max(0.0, -float(normal.min()))
            self.models.append(model)
            self.offsets.append(offset)
            self.thresholds.append(self._threshold(normal) + offset)
        self.threshold = 1.0  # on the averaged, per-member normalised score
        return self

    def _threshold(self, normal: np.ndarray) -> float:
        """The score a normal step exceeds with probability ``risk``: POT (a generalised Pareto tail
        fitted by moments to the excesses over the ``tail_quantile``), or the empirical ``quantile``."""
        if self.quantile is not None:
            return float(np.quantile(normal, self.quantile))
        t = float(np.quantile(normal, self.tail_quantile))
        y = normal[normal > t] - t
        if len(y) < 2 or y.var() == 0:
            return float(normal.max())
        m, v = float(y.mean()), float(y.var())
        xi, sigma = 0.5 * (1 - m * m / v), 0.5 * m * (m * m / v + 1)
        r = self.risk * len(normal) / len(y)  # the risk among the excesses
        return t + (sigma / xi * (r ** -xi - 1) if abs(xi) > 1e-6 else -sigma * math.log(r))

    def _train(self, x: torch.Tensor, known_bad: torch.Tensor, seed: int) -> _VAE:
        torch.manual_seed(seed)
        model = _VAE(x.shape[1], self.hidden, self.latent)
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        unlabelled = ~known_bad
        for epoch in range(self.epochs):
            loss_u, _ = model.neg_elbo(x[unlabelled], sample=True)
            if self.trim and epoch >= self.epochs // 4:  # the unlabelled windows that fit worst sit out
                keep = loss_u.detach() <= torch.quantile(loss_u.detach(), 1 - self.trim)
                loss_u = loss_u[keep]
            loss = loss_u.mean()
            if known_bad.any():  # labelled anomalies: reconstruction error pushed above the margin
                _, err = model.neg_elbo(x[known_bad], sample=False)
                loss = loss + torch.relu(self.margin * x.shape[1] ** 0.5 - err.sqrt()).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model

    def _score(self, model: _VAE, x: torch.Tensor) -> np.ndarray:
        """Negative ELBO at the posterior mean with the reconstruction of the window's last step
        only, plus ``residual_weight`` × that step's largest standardised squared residual."""
        with torch.no_grad():
            mu, logv = model.enc(x).chunk(2, -1)
            z2 = ((x - model.dec(mu)) ** 2 / model.log_var.exp()).view(len(x), len(FEATURES), self.window)[:, :, -1]
            nll = 0.5 * (z2 + model.log_var.view(len(FEATURES), self.window)[:, -1] + math.log(2 * math.pi)).sum(-1)
            kl = 0.5 * (mu ** 2 + logv.exp() - logv - 1).sum(-1)
        return (nll + kl + self.residual_weight * z2.max(-1).values).numpy()

    def score(self, trace: Trace) -> np.ndarray:
        """Per step: the members' scores, each divided by its threshold, averaged (flagged above 1)."""
        x = self._windows(trace)
        return np.mean([(self._score(m, x) + o) / t for m, o, t in zip(self.models, self.offsets, self.thresholds)],
                       axis=0)

    def predict(self, trace: Trace) -> np.ndarray:
        return (self.score(trace) > self.threshold).astype(np.int64)


def evaluate_detector(pred: np.ndarray, trace: Trace, *, aftermath: str = "ignore") -> dict:
    """Point-wise precision/recall/F1 and event-level recall over the injected segments;
    ``aftermath``: ``"ignore"`` (steps of a fault's draining backlog are not scored) or
    ``"normal"`` (they are normal steps)."""
    if aftermath not in ("ignore", "normal"):
        raise ConfigError(f"aftermath must be 'ignore' or 'normal', got {aftermath!r}")
    y, pred = trace.labels, np.asarray(pred)
    scored = np.ones(len(y), dtype=bool)
    if aftermath == "ignore" and trace.aftermath is not None:
        scored = trace.aftermath == 0
    tp = int(((y == 1) & (pred == 1)).sum())
    flagged = int(pred[scored].sum())
    precision = tp / max(1, flagged)
    recall = tp / max(1, int(y.sum()))
    events = [bool(pred[s:e].any()) for s, e, _ in trace.kinds]
    by_kind = {k: float(np.mean([hit for (s, e, kk), hit in zip(trace.kinds, events) if kk == k] or [0.0]))
               for k in KINDS}
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / max(1e-12, precision + recall),
            "event_recall": float(np.mean(events)) if events else 0.0, "event_recall_by_kind": by_kind,
            "flagged": flagged, "anomalous": int(y.sum()), "aftermath_steps": int((~scored).sum())}


def semi_supervised_labels(trace: Trace, fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """Labels as an operator would have them: ``fraction`` of the anomalous segments and of the
    normal steps marked, everything else unknown (-1). Steps of a fault's aftermath (a backlog
    still draining) are never marked normal: an operator reviewing an incident would not call them
    normal operation (marking them inflated the threshold above the early steps of slow faults)."""
    rng = np.random.default_rng(seed)
    labels = np.full(len(trace.labels), -1)
    for s, e, _ in trace.kinds:
        if rng.random() < fraction:
            labels[s:e] = 1
    normal = trace.labels == 0
    if trace.aftermath is not None:
        normal &= trace.aftermath == 0
    normal = np.flatnonzero(normal)
    keep = rng.choice(normal, size=int(fraction * len(normal)), replace=False)
    labels[keep] = 0
    return labels
