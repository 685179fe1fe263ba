"""Continuous batching over the paged KV cache: requests join and leave at token boundaries.

:class:`PagedEngine` keeps a queue of waiting requests and a set of running ones. Each
:meth:`~PagedEngine.step` admits waiting requests whose prompts fit in the free blocks (prefilled
together in one ragged forward), then decodes one token for every running request in one forward;
a request that finishes (``max_new_tokens`` or its end-of-sequence token) or is cancelled frees
its blocks immediately, so the next waiting one can start. Each request decodes greedily
(``temperature=0``, the default) or samples at its own ``temperature`` / ``top_p`` from its own
seeded generator, so a request's tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError, KVCacheFullError
from .cache import PagedKVCache
from .quant import KVQuantConfig

log = logging.getLogger(__name__)


@dataclass
class Request:
    id: int
    prompt: list[int]
    max_new_tokens: int
    eos_token_id: int | Sequence[int] | None = None  # one or several end-of-sequence tokens
    output: list[int] = field(default_factory=list)
    done: bool = False
    cancelled: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    tag: Any = None  # the caller's (e.g. a tenant), seen by forward_context

    def stop_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else (e,) if isinstance(e, int) else tuple(e)

    def context(self) -> list[int]:
        """What a (re)started request prefills: its prompt and what it has produced so far."""
        return self.prompt + self.output


class PagedEngine:
    """Greedy continuous-batching generation of ``model`` on a :class:`PagedKVCache`."""

    def __init__(self, model, cache: PagedKVCache, *, max_batch: int = 64, prefill_chunk: int | None = None,
                 forward_context: Callable[[list[Request]], AbstractContextManager] | None = None):
        """``forward_context(requests)``: a context every forward runs in, given the requests of
        its rows in order (e.g. to tell a multi-tenant model which tenant each row is)."""
        self.model, self.cache, self.max_batch = model, cache, max_batch
        self.forward_context = forward_context
        self.prefill_chunk = prefill_chunk
        self._cache_kw = cache_kwarg(model)
        self._keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}
        self.finished: dict[int, Request] = {}
        self._ids = itertools.count()
        self.steps = 0
        self.peak_blocks = 0
        self.preemptions = 0
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    def add_request(self, prompt: Sequence[int], max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None, *,
                    temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, tag: Any = None) -> int:
        """Queue a request; returns its id. ``temperature=0`` decodes greedily; otherwise tokens are
        sampled from the softmax at ``temperature`` restricted to the nucleus ``top_p``, with a
        generator seeded by ``seed`` (random when None)."""
        prompt = [int(t) for t in prompt]
        if temperature < 0 or not 0 < top_p <= 1:
            raise ConfigError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
        if not prompt:
            raise ConfigError("a request needs at least one prompt token")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        bs = self.cache.block_size
        need = -(-(len(prompt) + max_new_tokens) // bs)  # the request alone must fit
        if need > self.cache.blocks.capacity:
            raise KVCacheFullError(f"a request of {len(prompt)} + {max_new_tokens} tokens needs {need} KV blocks, "
                                   f"more than the cache's {self.cache.blocks.capacity}: raise num_blocks")
        gen = None
        if temperature > 0:
            gen = torch.Generator()
            gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 2)
        req = Request(next(self._ids), prompt, max_new_tokens, eos_token_id, temperature=temperature, top_p=top_p,
                      generator=gen, tag=tag)
        self.waiting.append(req)
        return req.id

    def cancel(self, rid: int) -> None:
        """Stop a request now and free its blocks."""
        if rid in self.running:
            req = self.running.pop(rid)
            self.cache.free(rid)
        else:
            req = next((r for r in self.waiting if r.id == rid), None)
            if req is None:
                return
            self.waiting.remove(req)
        req.cancelled = req.done = True
        self.finished[rid] = req

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @torch.no_grad()
    def _forward(self, reqs: list[Request], tokens: list[list[int]]) -> torch.Tensor:
        """One forward of ``tokens`` appended to each request's cache; the logits of each row's
        last token, (len(reqs), vocab)."""
        n_new = [len(t) for t in tokens]
        pos, mask = self.cache.prepare([r.id for r in reqs], n_new, device=self.device, dtype=self.dtype,
                                       mask=self.cache.needs_mask)
        T = max(n_new)
        ids = torch.zeros(len(reqs), T, dtype=torch.long)
        for i, t in enumerate(tokens):
            ids[i, : len(t)] = torch.tensor(t)
        last = torch.tensor(n_new) - 1
        extra = {self._cache_kw: self.cache}
        if self._keep_logits and T > 1:  # the vocabulary projection of each row's last token only
            extra["logits_to_keep"] = last[:, None].to(self.device)
        rows = self.forward_context(reqs) if self.forward_context is not None else contextlib.nullcontext()
        with self.cache.attach(self.model), rows:
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask, position_ids=pos,
                                use_cache=True, **extra).logits
        self.peak_blocks = max(self.peak_blocks, self.cache.blocks.capacity - self.cache.num_free_blocks)
        if "logits_to_keep" in extra or T == 1:
            return logits[:, -1]
        return logits[torch.arange(len(reqs), device=logits.device), last.to(logits.device)]

    @staticmethod
    def _pick(reqs: list[Request], logits: torch.Tensor) -> list[int]:
        """Each request's next token from its row of ``logits``: argmax, or a sample."""
        out = logits.argmax(-1).tolist()
        for i, req in enumerate(reqs):
            if req.temperature > 0:
                out[i] = sample_token(logits[i], req.temperature, req.top_p, req.generator)
        return out

    def _prefill(self, reqs: list[Request]) -> list[int]:
        """Prefill ``reqs``, grouped by length so that padding stays under a quarter of the
        computed tokens; returns each request's first token."""
        order = sorted(range(len(reqs)), key=lambda i: len(reqs[i].context()))
        groups: list[list[int]] = [[]]
        for i in order:
            g = groups[-1] + [i]
            real = sum(len(reqs[j].context()) for j in g)
            if groups[-1] and len(reqs[i].context()) * len(g) > 1.25 * real:
                groups.append([i])
            else:
                groups[-1] = g
        first: dict[int, int] = {}
        for g in groups:
            for i, tok in zip(g, self._prefill_group([reqs[j] for j in g])):
                first[i] = tok
        return [first[i] for i in range(len(reqs))]

    def _prefill_group(self, reqs: list[Request]) -> list[int]:
        """Prefill the contexts of ``reqs`` together, in chunks of ``prefill_chunk`` tokens
        when set (bounds the attention's memory on long prompts); returns each first token."""
        contexts = [r.context() for r in reqs]
        chunk = self.prefill_chunk or max(len(c) for c in contexts)
        last: dict[int, torch.Tensor] = {}
        for at in range(0, max(len(c) for c in contexts), chunk):
            rows = [i for i, c in enumerate(contexts) if len(c) > at]
            logits = self._forward([reqs[i] for i in rows], [contexts[i][at : at + chunk] for i in rows])
            for i, row in zip(rows, logits):
                last[i] = row  # the last chunk of a row gives its next token
        return self._pick(reqs, torch.stack([last[i] for i in range(len(reqs))]))

    def _emit(self, req: Request, token: int, out: list[tuple[int, int]]) -> None:
        req.output.append(token)
        out.append((req.id, token))
        if len(req.output) >= req.max_new_tokens or token in req.stop_ids():
            req.done = True
            del self.running[req.id]
            self.cache.free(req.id)
            self.finished[req.id] = req

    def _admit(self) -> list[Request]:
        admitted: list[Request] = []
        while self.waiting and len(self.running) + len(admitted) < self.max_batch:
            req = self.waiting[0]
            # room for the prompt and one decode step of every running request
            need_running = sum(self.cache.blocks.blocks_needed(r.id, 1) for r in self.running.values())
            need = -(-len(req.context()) // self.cache.block_size) + need_running
            need += sum(-(-len(r.context()) // self.cache.block_size) for r in admitted)
            if need > self.cache.num_free_blocks:
                break
            self.waiting.popleft()
            self.cache.add(req.id)
            admitted.append(req)
        return admitted

    def step(self) -> list[tuple[int, int]]:
        """Admit what fits, prefill it, decode one token for every running request; returns
        the ``(request id, token)`` pairs produced."""
        out: list[tuple[int, int]] = []
        decoding = list(self.running.values())
        admitted = self._admit()
        for req in admitted:
            self.running[req.id] = req
        if admitted:
            for req, tok in zip(admitted, self._prefill(admitted)):
                self._emit(req, tok, out)
        if decoding:
            self._decode(decoding, out)
        if not out and self.waiting and not self.running:
            raise KVCacheFullError("the next waiting request does not fit in an empty cache: raise num_blocks")
        self.steps += 1
        return out

    def _decode(self, decoding: list[Request], out: list[tuple[int, int]]) -> None:
        """One decode forward for the running requests (one token each); preempts the newest
        requests while their next tokens do not fit."""
        while decoding and not self.cache.can_fit([r.id for r in decoding], [1] * len(decoding)):
            self._preempt(decoding.pop())  # the newest running request gives its blocks back
        if decoding:
            toks = self._pick(decoding, self._forward(decoding, [[r.output[-1]] for r in decoding]))
            for req, tok in zip(decoding, toks):
                self._emit(req, tok, out)

    def _preempt(self, req: Request) -> None:
        """Recompute-style preemption (vLLM's default): drop the KV, requeue prompt + output."""
        log.info("KV cache full: preempting request %d", req.id)
        del self.running[req.id]
        self.cache.free(req.id)
        self.preemptions += 1
        self.waiting.appendleft(req)

    def run(self) -> dict[int, list[int]]:
        while self.has_unfinished():
            self.step()
        return {rid: r.output for rid, r in sorted(self.finished.items())}


def sample_token(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> int:
    """A token drawn from softmax(logits / temperature), restricted to the smallest set of most
    likely tokens whose probability reaches ``top_p`` (nucleus sampling)."""
    probs = torch.softmax(logits.detach().float().cpu() / temperature, dim=-1)
    if top_p < 1:
        p, idx = probs.sort(descending=True)
        keep = (p.cumsum(-1) - p) < top_p  # a token stays if the mass before it is below top_p
        probs = torch.zeros_like(probs).scatter_(-1, idx[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def cache_kwarg(model) -> str:
    """The name under which ``model.forward`` takes its cache (``cache`` since transformers 5.2x,
    ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, num_blocks: int | None = None,
             block_size: int = 16, quant: KVQuantConfig | None = None, max_batch: int = 64,
             eos_token_id: int | None = None, prefill_chunk: int | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids) with continuous batching on a paged cache;
    ``num_blocks`` defaults to room for every request at once."""
    if num_blocks is None:
        num_blocks = sum(-(-(len(p) + max_new_tokens) // block_size) for p in prompts)
    cache = PagedKVCache(num_blocks, block_size, quant=quant)
    engine = PagedEngine(model, cache, max_batch=max_batch, prefill_chunk=prefill_chunk)
    ids = [engine.add_request(p, max_new_tokens, eos_token_id) for p in prompts]
    out = engine.run()
    return [out[i] for i in ids]
