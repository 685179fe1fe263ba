"""The serving engine: one :class:`~llmdeploy.kv.PagedEngine` stepped by a background thread,
fed by asyncio request handlers.

Handlers :meth:`~ServingEngine.submit` requests and read their tokens from a per-request queue;
the thread takes new requests and cancellations only between engine steps, so requests join and
leave the running batch at token boundaries (continuous batching). Limits are checked on
submission: a prompt and its completion must fit the context and the KV cache (else
:class:`~llmdeploy.errors.RequestError`, HTTP 400), and the queue of requests not yet admitted
is bounded in requests and prompt tokens (else :class:`~llmdeploy.errors.ServerOverloadedError`,
HTTP 429). A cancelled request — its client went away — frees its KV blocks at the next step.
With a ``drafter`` the engine is a :class:`~llmdeploy.decode.SpeculativeEngine`: greedy requests
get several tokens per step, their output unchanged.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch

from ..decode import SpeculativeEngine
from ..errors import RequestError, ServerOverloadedError
from ..kv import PagedEngine, PagedKVCache
from .metrics import ServerMetrics

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    """What one request asks for: greedy at ``temperature=0``; ``stop_token_ids`` end it like EOS;
    ``ignore_eos`` runs to ``max_tokens`` (vLLM's option, for load tests)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def check(self) -> None:
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise RequestError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Finished:
    """The last event of a request's stream."""

    reason: str  # "stop" (a stop token), "length" (max_tokens), "abort" (cancelled), "error"
    message: str = ""


@dataclass
class _Handle:
    id: int
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float = field(default_factory=time.monotonic)
    tag: object = None  # passed to the engine's forward_context (a tenant)
    rid: int | None = None  # the engine's request id, once added
    last_token_at: float | None = None
    n_out: int = 0


class ServingEngine:
    """Continuous-batching generation for a server (see the module docstring).

    ``kv_blocks`` defaults to room for ``max_batch`` full-context requests, capped at
    ``kv_memory_gib`` of KV storage (measured per token on this model, so no architecture
    knowledge is needed)."""

    def __init__(self, model, *, eos_token_ids: Sequence[int] = (), max_batch: int = 16, kv_blocks: int | None = None,
                 block_size: int = 16, kv_memory_gib: float = 1.0, max_model_len: int | None = None,
                 max_waiting: int = 256, max_waiting_tokens: int | None = None, prefill_chunk: int | None = 512,
                 metrics: ServerMetrics | None = None, forward_context=None, drafter=None) -> None:
        self.model = model.eval()
        context = getattr(model.config, "max_position_embeddings", None)
        self.max_model_len = min(x for x in (max_model_len, context, 1 << 30) if x)
        if kv_blocks is None:
            per_block = kv_bytes_per_token(model, block_size) * block_size
            want = max_batch * -(-self.max_model_len // block_size)
            kv_blocks = max(1, min(want, int(kv_memory_gib * 2**30 // per_block)))
        self.cache = PagedKVCache(kv_blocks, block_size)
        self.speculative = drafter is not None
        if drafter is None:
            self.engine = PagedEngine(model, self.cache, max_batch=max_batch, prefill_chunk=prefill_chunk,
                                      forward_context=forward_context)
        else:  # speculative decoding (decode.SpeculativeEngine)
            self.engine = SpeculativeEngine(model, self.cache, drafter, max_batch=max_batch,
                                            prefill_chunk=prefill_chunk, forward_context=forward_context)
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.max_waiting_tokens = max_waiting_tokens or 64 * self.max_model_len
        self.metrics = metrics
        self._ids = itertools.count()
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._waiting: dict[int, _Handle] = {}  # submitted, no token yet
        self._by_rid: dict[int, _Handle] = {}
        self._thread: threading.Thread | None = None
        self._arrivals: deque[float] = deque(maxlen=100_000)  # submit times, for window_stats
        self._ttfts: deque[tuple[float, float]] = deque(maxlen=100_000)  # (first token at, TTFT)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="llmdeploy-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # -- submission (event-loop side) ---------------------------------------------------------
    def check(self, n_prompt: int, params: SamplingParams) -> None:
        """Raise :class:`RequestError` for a request that can never run here."""
        params.check()
        if n_prompt < 1:
            raise RequestError("the prompt is empty: send at least one token")
        if n_prompt + params.max_tokens > self.max_model_len:
            raise RequestError(f"this model's maximum context length is {self.max_model_len} tokens, but the "
                               f"request needs {n_prompt + params.max_tokens} ({n_prompt} in the prompt, "
                               f"{params.max_tokens} in the completion): shorten the prompt or lower max_tokens")
        need = -(-(n_prompt + params.max_tokens) // self.cache.block_size)
        if need > self.cache.blocks.capacity:
            raise RequestError(f"the request needs {need} KV blocks, more than the server's {self.cache.blocks.capacity}"
                               f": lower max_tokens, or restart the server with more --kv-blocks")

    def submit(self, prompt: Sequence[int], params: SamplingParams, tag: object = None) -> _Handle:
        """Queue a request (call from the event loop); raises on bad or excess requests."""
        prompt = [int(t) for t in prompt]
        self.check(len(prompt), params)
        with self._lock:
            waiting_tokens = sum(len(h.prompt) for h in self._waiting.values())
            if len(self._waiting) >= self.max_waiting or waiting_tokens + len(prompt) > self.max_waiting_tokens:
                raise ServerOverloadedError(
                    f"the server is overloaded ({len(self._waiting)} requests, {waiting_tokens} prompt tokens "
                    f"waiting; limits {self.max_waiting} and {self.max_waiting_tokens}): retry later")
            h = _Handle(next(self._ids), prompt, params, asyncio.get_running_loop(), asyncio.Queue(), tag=tag)
            self._waiting[h.id] = h
            self._arrivals.append(h.arrival)
        self._inbox.put(("add", h))
        self._wake.set()
        return h

    def cancel(self, h: _Handle) -> None:
        """Stop a request and free its KV at the next token boundary (safe to call twice)."""
        self._inbox.put(("cancel", h))
        self._wake.set()

    async def events(self, h: _Handle) -> AsyncIterator[int | Finished]:
        """A submitted request's token ids, then a :class:`Finished`; leaving early (the client
        went away) cancels the request."""
        done = False
        try:
            while True:
                item = await h.queue.get()
                done = isinstance(item, Finished)
                yield item
                if done:
                    return
        finally:
            if not done:
                self.cancel(h)

    async def stream(self, prompt: Sequence[int], params: SamplingParams) -> AsyncIterator[int | Finished]:
        """:meth:`submit`, then :meth:`events`."""
        async for item in self.events(self.submit(prompt, params)):
            yield item

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self.engine.running)

    def window_stats(self, window_s: float = 10.0) -> dict[str, float]:
        """The last ``window_s`` seconds as an autoscaler or a detector sees them: arrivals per
        second, p95 time to first token (0 when no first token came), and the current running and
        waiting requests and KV usage."""
        now = time.monotonic()
        with self._lock:
            arrivals = sum(1 for t in self._arrivals if t > now - window_s)
            ttfts = sorted(v for t, v in self._ttfts if t > now - window_s)
            waiting = len(self._waiting)
        cap = self.cache.blocks.capacity
        p95 = ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] if ttfts else 0.0
        return {"request_rate": arrivals / window_s, "running": float(len(self.engine.running)),
                "waiting": float(waiting), "kv_usage": (cap - self.cache.num_free_blocks) / cap,
                "ttft_p95_s": p95}

    # -- the engine thread --------------------------------------------------------------------
    def _deliver(self, h: _Handle, item) -> None:
        try:
            h.loop.call_soon_threadsafe(h.queue.put_nowait, item)
        except RuntimeError:  # the handler's loop is closed: nobody is listening
            pass

    def _drain(self) -> None:
        while True:
            try:
                op, h = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                if h.rid is None and h.id in self._waiting:
                    p = h.params
                    h.rid = self.engine.add_request(h.prompt, p.max_tokens, self._stops(h),
                                                    temperature=p.temperature, top_p=p.top_p, seed=p.seed, tag=h.tag)
                    self._by_rid[h.rid] = h
            elif op == "cancel":
                with self._lock:
                    self._waiting.pop(h.id, None)
                if h.rid is not None and h.rid in self._by_rid:
                    self.engine.cancel(h.rid)
                    self.engine.finished.pop(h.rid, None)
                    del self._by_rid[h.rid]
                    self._deliver(h, Finished("abort"))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain()
            if not self.engine.has_unfinished():
                self._update_gauges()
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            preempted = self.engine.preemptions
            spec = (self.engine.spec_draft_tokens, self.engine.spec_accepted_tokens) if self.speculative else None
            try:
                out = self.engine.step()
            except Exception as e:  # a failed step fails its requests, not the server
                log.exception("engine step failed")
                self._fail_all(f"{type(e).__name__}: {e}")
                continue
            if spec is not None:
                self._record_spec(spec)
            self._record(out, self.engine.preemptions - preempted)
        self._fail_all("the server is shutting down")

    def _record_spec(self, before: tuple[int, int]) -> None:
        m = self.metrics
        if m:
            m.label(m.spec_draft).inc(self.engine.spec_draft_tokens - before[0])
            m.label(m.spec_accepted).inc(self.engine.spec_accepted_tokens - before[1])

    def _record(self, out: list[tuple[int, int]], preempted: int) -> None:
        now = time.monotonic()
        m = self.metrics
        last = {rid: i for i, (rid, _) in enumerate(out)}  # a speculative step gives a request several tokens
        if m:  # counters and gauges first: a client that reads /metrics after its answer sees them
            m.tokens_generated(len(out))
            if preempted:
                m.label(m.preemptions).inc(preempted)
        self._update_gauges()
        for i, (rid, tok) in enumerate(out):
            h = self._by_rid.get(rid)
            if h is None:
                continue
            if h.n_out == 0:
                with self._lock:
                    self._waiting.pop(h.id, None)
                    self._ttfts.append((now, now - h.arrival))
                if m:
                    m.label(m.ttft).observe(now - h.arrival)
                    m.label(m.prompt_tokens).inc(len(h.prompt))
            elif m:
                m.label(m.itl).observe(now - h.last_token_at)
            h.n_out += 1
            h.last_token_at = now
            self._deliver(h, tok)
            req = self.engine.finished.pop(rid, None) if last[rid] == i else None
            if req is not None:  # done: its blocks are free already
                del self._by_rid[rid]
                reason = "length" if len(req.output) >= req.max_new_tokens and tok not in self._stops(h) else "stop"
                if m:
                    m.label(m.e2e).observe(now - h.arrival)
                    m.label(m.success, finished_reason=reason).inc()
                self._deliver(h, Finished(reason))
        self._update_gauges()

    def _stops(self, h: _Handle) -> tuple[int, ...]:
        return (() if h.params.ignore_eos else self.eos_token_ids) + tuple(h.params.stop_token_ids)

    def _update_gauges(self) -> None:
        m = self.metrics
        if m:
            m.label(m.running).set(len(self.engine.running))
            m.label(m.waiting).set(len(self._waiting))
            cap = self.cache.blocks.capacity
            m.label(m.kv_usage).set((cap - self.cache.num_free_blocks) / cap)

    def _fail_all(self, message: str) -> None:
        for rid, h in list(self._by_rid.items()):
            self.engine.cancel(rid)
            self.engine.finished.pop(rid, None)
            self._deliver(h, Finished("error", message))  # the HTTP layer counts the error
        self._by_rid.clear()
        with self._lock:
            self._waiting.clear()


def kv_bytes_per_token(model, block_size: int = 16) -> float:
    """KV-cache bytes per token of ``model``, measured on a one-block cache (one token through
    the model), so it holds for any architecture the engine runs."""
    probe = PagedKVCache(1, block_size)
    eng = PagedEngine(model, probe, max_batch=1)
    with torch.no_grad():
        eng.add_request([0], 1)
        eng.step()
    return probe.bytes_per_token()
