"""Speed and memory: prefill and decode throughput, per-token latency, peak memory.

Protocol: random prompts of ``prompt_len`` tokens; ``warmup`` untimed runs, then ``repeats``
timed ones, medians reported. Prefill = one forward over the prompt. Decode = ``new_tokens``
greedy steps with the KV cache, each step timed; latency p50/p95 are over all timed steps at
batch 1. Peak memory: CUDA's allocator peak on GPU; on CPU the peak resident set size sampled
every millisecond, minus the resident size before the run (so it is what the run added).
"""

from __future__ import annotations

import inspect
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class SpeedResult:
    prompt_len: int
    new_tokens: int
    prefill_tokens_per_s: dict[int, float] = field(default_factory=dict)  # by batch size
    decode_tokens_per_s: dict[int, float] = field(default_factory=dict)  # by batch size
    latency_ms_p50: float = float("nan")  # per generated token, batch 1
    latency_ms_p95: float = float("nan")
    peak_memory_mb: float = float("nan")
    device: str = "cpu"
    threads: int = 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prefill_tokens_per_s"] = {str(k): v for k, v in self.prefill_tokens_per_s.items()}
        d["decode_tokens_per_s"] = {str(k): v for k, v in self.decode_tokens_per_s.items()}
        return d


class _RSSPeak:
    """Peak resident set size of this process while the block runs (sampled by a thread)."""

    def __init__(self, interval: float = 0.001) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def added_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _prefill(model, ids: torch.Tensor) -> float:
    device = ids.device
    _sync(device)
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _sync(device)
    return time.perf_counter() - t0


def _cache_kw(model) -> str:
    """The forward argument that takes the KV cache (``cache`` in newer transformers)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def _decode(model, ids: torch.Tensor, new_tokens: int) -> list[float]:
    """Per-step seconds of ``new_tokens`` greedy decode steps after a prefill."""
    device = ids.device
    kw = _cache_kw(model)
    out = model(input_ids=ids, use_cache=True)
    past = _cache_of(out)
    nxt = out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(new_tokens):
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=nxt, use_cache=True, **{kw: past})
        past = _cache_of(out)
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        steps.append(time.perf_counter() - t0)
    return steps


@torch.no_grad()
def _decode_compiled(model, ids: torch.Tensor, new_tokens: int, *, backend: str = "inductor",
                     tokens: list | None = None) -> list[float]:
    """As :func:`_decode`, with every decode step one ``torch.compile`` graph over a static KV
    cache (compressed modules enter the graph as opaque operators: ``llmdeploy.kernels.opaque``).
    The graph and the cache are made on first use and kept with the model (the first call pays the
    compilation); the prefill runs eagerly into the same cache. ``tokens``: a list that receives
    the greedy tokens (batch, new_tokens)."""
    from transformers import StaticCache

    need = ids.shape[1] + new_tokens + 1
    state = model.__dict__.get("_llmdeploy_compiled_decode")
    if state is None or state["length"] < need or state["batch"] != ids.shape[0] or state["backend"] != backend:
        length = max(need, 256)
        state = {"length": length, "batch": ids.shape[0], "backend": backend,
                 "step": torch.compile(model, dynamic=False, backend=backend, fullgraph=True),
                 "cache": StaticCache(config=model.config, max_cache_len=length)}
        model.__dict__["_llmdeploy_compiled_decode"] = state
    cache, step, kw = state["cache"], state["step"], _cache_kw(model)
    cache.reset()
    device, n = ids.device, ids.shape[1]
    out = model(input_ids=ids, use_cache=True, cache_position=torch.arange(n, device=device), **{kw: cache})
    nxt = out.logits[:, -1:].argmax(-1)
    steps, made = [], [nxt]
    for i in range(new_tokens):
        _sync(device)
        t0 = time.perf_counter()
        out = step(input_ids=nxt, use_cache=True, cache_position=torch.tensor([n + i], device=device), **{kw: cache})
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        steps.append(time.perf_counter() - t0)
        made.append(nxt)
    if tokens is not None:
        tokens.extend(torch.cat(made[:new_tokens], dim=1).tolist())
    return steps


def speed(
    model,
    tokenizer=None,
    *,
    prompt_len: int = 128,
    new_tokens: int = 32,
    batch_sizes: Sequence[int] = (1, 8),
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
) -> SpeedResult:
    """Measure prefill and decode speed of ``model`` (see the module docstring for the protocol)."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    res = SpeedResult(prompt_len=prompt_len, new_tokens=new_tokens, device=str(device),
                      threads=torch.get_num_threads())
    was_training = model.training
    model.eval()
    latencies: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    meter = _RSSPeak() if device.type != "cuda" else None
    if meter is not None:
        meter.__enter__()
    try:
        for bs in batch_sizes:
            ids = torch.randint(0, vocab, (bs, prompt_len), generator=gen).to(device)
            for _ in range(warmup):
                _prefill(model, ids)
                _decode(model, ids, min(new_tokens, 4))
            pre = [_prefill(model, ids) for _ in range(repeats)]
            res.prefill_tokens_per_s[bs] = bs * prompt_len / statistics.median(pre)
            step_medians = []
            for _ in range(repeats):
                steps = _decode(model, ids, new_tokens)
                step_medians.append(statistics.median(steps))
                if bs == 1:
                    latencies.extend(steps)
            res.decode_tokens_per_s[bs] = bs / statistics.median(step_medians)
    finally:
        if meter is not None:
            meter.__exit__(None, None, None)
        model.train(was_training)
    if latencies:
        q = statistics.quantiles(latencies, n=20, method="inclusive")
        res.latency_ms_p50 = statistics.median(latencies) * 1e3
        res.latency_ms_p95 = q[18] * 1e3
    if device.type == "cuda":
        res.peak_memory_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        res.peak_memory_mb = meter.added_mb
    return res
