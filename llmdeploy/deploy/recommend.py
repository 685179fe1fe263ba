"""Serving configuration from measurements (ENOVA's configuration recommendation, on this
library's engine): how many requests to batch, how many KV blocks, how many replicas.

:func:`measure_profile` times the model on this machine — prefill seconds per prompt token and
the decode step's seconds at several batch sizes, fitted as ``t(b) = a + c·b`` — and measures
the KV bytes per token and the weights' bytes. :func:`recommend` turns a profile, the memory of
one replica and a workload (request rate, mean prompt and output lengths, latency SLOs) into a
:class:`Recommendation`:

* KV budget = memory − weights − ``reserve`` (activations, allocator slack), in whole blocks;
* max batch = the largest b whose b full requests fit the KV budget and whose decode step meets
  the per-token SLO (``tpot_slo``);
* replica capacity μ = b / (O·t(b) + P·prefill) requests/s with b requests in flight; replicas =
  ⌈λ / (``target_utilization``·μ)⌉, then raised until the M/M/c estimate of p95 time-to-first-
  token (queueing + prefill) meets ``ttft_slo``;
* the same decision as vLLM engine arguments (``max_num_seqs``, ``gpu_memory_utilization``,
  ``tensor_parallel_size``, ``max_model_len``) for a GPU of ``gpu_memory_bytes``.

ENOVA's open code reads these settings from a table per model family; its paper derives them
from monitored metrics. This module derives them from measured latencies and memory, which is
what a user can reproduce on their own machine.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..errors import ConfigError


@dataclass
class Profile:
    """What one replica of a model costs on one machine."""

    weight_bytes: int
    kv_bytes_per_token: float
    prefill_s_per_token: float
    decode_a: float  # decode step seconds = decode_a + decode_c * batch
    decode_c: float
    max_model_len: int
    measured: dict = field(default_factory=dict)  # raw timings

    def decode_step(self, batch: int) -> float:
        return self.decode_a + self.decode_c * batch


@dataclass
class Workload:
    request_rate: float  # requests per second, all replicas together
    prompt_tokens: float = 256
    output_tokens: float = 128
    ttft_slo: float = 2.0  # seconds, p95
    tpot_slo: float = 0.2  # seconds per output token


@dataclass
class Recommendation:
    max_batch: int
    kv_blocks: int
    block_size: int
    replicas: int
    capacity_rps: float  # one replica
    utilization: float
    p95_ttft_s: float
    decode_step_s: float
    memory_used_bytes: int
    memory_bytes: int
    limited_by: str  # what set max_batch: "memory", "tpot_slo" or "max_batch_cap"
    vllm_args: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def serve_command(self, model: str) -> str:
        return (f"llmdeploy serve {model} --max-batch {self.max_batch} --kv-blocks {self.kv_blocks} "
                f"--block-size {self.block_size}")


def measure_profile(model, *, batch_sizes: tuple[int, ...] = (1, 2, 4, 8), prompt_len: int = 64,
                    decode_steps: int = 8, repeats: int = 3, block_size: int = 16) -> Profile:
    """Time ``model`` on this machine with the paged engine (medians of ``repeats``)."""
    from ..eval.footprint import footprint
    from ..kv import PagedEngine, PagedKVCache
    from ..serve.engine import kv_bytes_per_token

    vocab = getattr(model.config, "vocab_size", 256)
    g = torch.Generator().manual_seed(0)
    prefill, decode = [], {}
    for b in batch_sizes:
        runs_p, runs_d = [], []
        for _ in range(repeats):
            need = b * -(-(prompt_len + decode_steps + 1) // block_size)
            eng = PagedEngine(model, PagedKVCache(need, block_size), max_batch=b)
            for _ in range(b):
                eng.add_request(torch.randint(0, vocab, (prompt_len,), generator=g).tolist(), decode_steps + 1)
            t0 = time.perf_counter()
            eng.step()  # admits and prefills every request
            t1 = time.perf_counter()
            for _ in range(decode_steps):
                eng.step()
            t2 = time.perf_counter()
            runs_p.append((t1 - t0) / (b * prompt_len))
            runs_d.append((t2 - t1) / decode_steps)
        prefill.append(sorted(runs_p)[len(runs_p) // 2])
        decode[b] = sorted(runs_d)[len(runs_d) // 2]
    xs = torch.tensor(list(decode), dtype=torch.float64)
    ys = torch.tensor(list(decode.values()), dtype=torch.float64)
    if len(xs) > 1:  # least squares t(b) = a + c b
        A = torch.stack([torch.ones_like(xs), xs], 1)
        a, c = torch.linalg.lstsq(A, ys[:, None]).solution[:, 0].tolist()
    else:
        a, c = float(ys[0]), 0.0
    a, c = max(a, 0.0), max(c, 0.0)
    context = getattr(model.config, "max_position_embeddings", 2048)
    return Profile(weight_bytes=int(footprint(model).bytes), kv_bytes_per_token=kv_bytes_per_token(model, block_size),
                   prefill_s_per_token=min(prefill), decode_a=a, decode_c=c, max_model_len=context,
                   measured={"decode_step_s": {str(k): v for k, v in decode.items()},
                             "prefill_s_per_token": dict(zip(map(str, batch_sizes), prefill))})


def _erlang_c(c: int, a: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with offered load ``a`` (< c), from
    the Erlang-B recursion (stable for thousands of servers)."""
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    return c * b / (c - a * (1 - b))


def p95_ttft(rate: float, servers: int, service_s: float, prefill_s: float) -> float:
    """p95 time to first token: M/M/c waiting time for a slot (``servers`` = replicas × batch,
    mean holding time ``service_s``) plus the prompt's prefill."""
    a = rate * service_s
    if a >= servers:
        return math.inf
    pw = _erlang_c(servers, a)
    # P(W > t) = pw * exp(-(c mu - lambda) t)
    drain = servers / service_s - rate
    wait = 0.0 if pw <= 0.05 else math.log(pw / 0.05) / drain
    return wait + prefill_s


def recommend(profile: Profile, workload: Workload, memory_bytes: int, *, block_size: int = 16,
              reserve: float = 0.1, max_batch_cap: int = 256, target_utilization: float = 0.8,
              max_replicas: int = 1024, gpu_memory_bytes: int | None = None) -> Recommendation:
    """The configuration for ``workload`` on replicas of ``memory_bytes`` each (see the module
    docstring); raises :class:`ConfigError` when nothing fits or no number of replicas meets the SLO."""
    if not 0 <= reserve < 1 or not 0 < target_utilization <= 1:
        raise ConfigError("reserve must be in [0, 1) and target_utilization in (0, 1]")
    n_in, n_out = workload.prompt_tokens, workload.output_tokens
    if n_in + n_out > profile.max_model_len:
        raise ConfigError(f"a request of {n_in:.0f} + {n_out:.0f} tokens exceeds the model's context ({profile.max_model_len})")
    block_bytes = profile.kv_bytes_per_token * block_size
    budget = memory_bytes * (1 - reserve) - profile.weight_bytes
    kv_blocks = int(budget // block_bytes)
    per_request = math.ceil((n_in + n_out) / block_size)
    if kv_blocks < per_request:
        raise ConfigError(f"{memory_bytes / 2**30:.2f} GiB per replica leaves {max(budget, 0) / 2**20:.0f} MiB for the KV "
                          f"cache after {profile.weight_bytes / 2**20:.0f} MiB of weights, less than one request's "
                          f"{per_request * block_bytes / 2**20:.1f} MiB: give each replica more memory or compress the model")
    by_memory = kv_blocks // per_request
    by_slo = max_batch_cap
    if profile.decode_c > 0:
        by_slo = int((workload.tpot_slo - profile.decode_a) // profile.decode_c)
    if by_slo < 1:
        raise ConfigError(f"one decode step takes {profile.decode_step(1) * 1e3:.1f} ms, over the per-token SLO of "
                          f"{workload.tpot_slo * 1e3:.0f} ms even alone: a faster machine or a smaller model is needed")
    max_batch = min(by_memory, by_slo, max_batch_cap)
    limited = "memory" if max_batch == by_memory else "tpot_slo" if max_batch == by_slo else "max_batch_cap"
    step = profile.decode_step(max_batch)
    prefill = n_in * profile.prefill_s_per_token
    service = n_out * step + prefill  # seconds a request holds one of the batch's slots
    capacity = max_batch / service
    replicas = max(1, math.ceil(workload.request_rate / (target_utilization * capacity)))
    while p95_ttft(workload.request_rate, replicas * max_batch, service, prefill) > workload.ttft_slo:
        replicas += 1
        if replicas > max_replicas:
            raise ConfigError(f"no number of replicas up to {max_replicas} meets a p95 TTFT of {workload.ttft_slo} s "
                              f"(prefill alone takes {prefill:.2f} s): shorten prompts or use a faster machine")
    used = profile.weight_bytes + kv_blocks * block_bytes
    vllm = {"max_num_seqs": max_batch, "max_model_len": int(min(profile.max_model_len, 2 ** math.ceil(math.log2(n_in + n_out)))),
            "block_size": block_size}
    if gpu_memory_bytes:
        tp = 1
        while profile.weight_bytes / tp + per_request * block_bytes > gpu_memory_bytes * (1 - reserve):
            tp *= 2
            if tp > 64:
                raise ConfigError("the model does not fit 64 GPUs of that memory")
        need = profile.weight_bytes / tp + max_batch * per_request * block_bytes / tp
        vllm.update(tensor_parallel_size=tp, gpu_memory_utilization=round(min(0.95, max(0.5, need / gpu_memory_bytes
                                                                                         + reserve)), 2))
    return Recommendation(max_batch=max_batch, kv_blocks=kv_blocks, block_size=block_size, replicas=replicas,
                          capacity_rps=capacity, utilization=workload.request_rate / (replicas * capacity),
                          p95_ttft_s=p95_ttft(workload.request_rate, replicas * max_batch, service, prefill),
                          decode_step_s=step, memory_used_bytes=int(used), memory_bytes=memory_bytes,
                          limited_by=limited, vllm_args=vllm)
