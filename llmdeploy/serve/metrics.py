"""Prometheus metrics of the server, under the names vLLM exports where vLLM has one (so that
dashboards and alerts written for vLLM work unchanged), each labelled with ``model_name``.

=========================================  =========  ============================================
name                                       type       what
=========================================  =========  ============================================
``vllm:num_requests_running``              gauge      requests in the running batch
``vllm:num_requests_waiting``              gauge      requests queued, not yet admitted
``vllm:kv_cache_usage_perc``               gauge      fraction of KV blocks in use (0–1)
``vllm:num_preemptions_total``             counter    requests preempted for KV space
``vllm:prompt_tokens_total``               counter    prompt tokens admitted
``vllm:generation_tokens_total``           counter    tokens generated
``vllm:request_success_total``             counter    finished requests, by ``finished_reason``
``vllm:time_to_first_token_seconds``       histogram  arrival to first token
``vllm:inter_token_latency_seconds``       histogram  between consecutive tokens of a request
``vllm:e2e_request_latency_seconds``       histogram  arrival to last token
``vllm:avg_generation_throughput_toks_per_s`` gauge   generated tokens/s over the last 10 s
``vllm:spec_decode_num_draft_tokens_total``   counter  candidates verified (with ``--drafter``)
``vllm:spec_decode_num_accepted_tokens_total`` counter candidates accepted (with ``--drafter``)
``llmdeploy:request_errors_total``         counter    rejected or failed requests, by HTTP ``code``
=========================================  =========  ============================================

vLLM has no error counter; that one has the library's own prefix.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    """The metrics of one server (one registry per server, so several can live in one process)."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, lab = self.registry, ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch", lab, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be admitted", lab, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full)", lab,
                              registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Requests preempted for KV space", lab, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens admitted", lab, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", lab, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests", lab + ["finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", lab, buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between consecutive tokens", lab,
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token", lab, buckets=_LATENCY,
                             registry=r)
        self.throughput = Gauge("vllm:avg_generation_throughput_toks_per_s", "Generated tokens/s over the last 10 s",
                                lab, registry=r)
        self.spec_draft = Counter("vllm:spec_decode_num_draft_tokens", "Draft tokens verified", lab, registry=r)
        self.spec_accepted = Counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted", lab, registry=r)
        self.errors = Counter("llmdeploy:request_errors", "Rejected or failed requests", lab + ["code"], registry=r)
        self.model_name = model_name
        self._recent: deque[tuple[float, int]] = deque()

    def label(self, metric, **extra):
        return metric.labels(model_name=self.model_name, **extra)

    def tokens_generated(self, n: int) -> None:
        """Count ``n`` tokens produced by one engine step; refresh the 10-second throughput."""
        now = time.monotonic()
        self.label(self.generation_tokens).inc(n)
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - 10:
            self._recent.popleft()
        span = max(now - self._recent[0][0], 1.0) if self._recent else 1.0
        self.label(self.throughput).set(sum(k for _, k in self._recent) / span)

    def error(self, code: int) -> None:
        self.label(self.errors, code=str(code)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
