"""Speculative decoding inside continuous batching: :class:`SpeculativeEngine` is a
:class:`~llmdeploy.kv.PagedEngine` whose decode step verifies drafted trees.

Requests still join and leave at token boundaries on the paged cache. At each decode step a
greedy request whose drafter has what it needs (the last hidden state, or hidden transfer's
drafts) gets a tree; others (a request's first step, sampled requests) a bare root, i.e. a plain
decode step in the same forward. When the trees do not fit in the free blocks, the step drops the
drafts before it preempts anyone. Instead of moving accepted keys and values inside the paged
blocks, a row's input is ``[tokens accepted last step ..., root] + candidates``: the accepted
tokens are recomputed as a chain in front of the tree (a few positions more per step) and, after
verification, the cache is truncated back to that chain — so the cache only ever holds tokens of
the accepted output, exactly as in plain decoding. Greedy requests keep plain greedy output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import SimpleNamespace

import torch

from ..errors import ConfigError
from ..kv import PagedEngine, PagedKVCache
from ..kv.engine import Request, sample_token
from ..models import get_adapter
from .base import Drafter
from .engine import accept_greedy
from .tree import TokenTree, tree_inputs


def _with_prefix(prefix: list[int], tree: TokenTree) -> TokenTree:
    """``prefix`` as a chain, then ``tree`` hung under its last token (the tree's root)."""
    r0 = len(prefix)
    full = TokenTree(list(prefix) + list(tree.tokens), list(range(-1, r0 - 1)) + [r0 - 1] +
                     [r0 + p for p in tree.parents[1:]],
                     count=[1] * r0 + list(tree.count), pseudo=[False] * r0 + list(tree.pseudo))
    return full


class SpeculativeEngine(PagedEngine):
    """A :class:`PagedEngine` with a ``drafter`` (Medusa, ReDrafter or hidden transfer; see the
    module docstring). ``spec_draft_tokens`` / ``spec_accepted_tokens`` count candidates verified
    and accepted."""

    def __init__(self, model, cache: PagedKVCache, drafter: Drafter, *, max_batch: int = 64,
                 prefill_chunk: int | None = None,
                 forward_context: Callable[[list[Request]], AbstractContextManager] | None = None):
        if not drafter.continuous:
            raise ConfigError(f"{type(drafter).__name__} cannot join a continuous-batching engine; "
                              "use Medusa, ReDrafter or HiddenTransfer (or decode.generate for draft models)")
        if not cache.supports_truncate:
            raise ConfigError(f"{type(cache).__name__} cannot drop rejected drafts; use a PagedKVCache")
        q = cache.quant
        if q is not None and "channel" in (q.key_axis, q.value_axis):
            raise ConfigError("speculative decoding needs a KV cache that is unquantized or quantized per token")
        super().__init__(model, cache, max_batch=max_batch, prefill_chunk=prefill_chunk, forward_context=forward_context)
        self.drafter = drafter
        self.adapter = get_adapter(model)
        drafter.begin(SimpleNamespace(model=model, adapter=self.adapter))
        self._pending: dict[int, list[int]] = {}  # request -> tokens emitted but not cached (last = root)
        self._hidden: dict[int, torch.Tensor] = {}  # request -> last hidden state before its root
        self.spec_draft_tokens = 0
        self.spec_accepted_tokens = 0

    def _forget(self, rid: int) -> None:
        self._pending.pop(rid, None)
        self._hidden.pop(rid, None)
        self.drafter.release([rid])

    def cancel(self, rid: int) -> None:
        super().cancel(rid)
        self._forget(rid)

    def _preempt(self, req: Request) -> None:
        super()._preempt(req)
        self._forget(req.id)

    @torch.no_grad()
    def _decode(self, decoding: list[Request], out: list[tuple[int, int]]) -> None:
        pend = {r.id: self._pending.get(r.id, [r.output[-1]]) for r in decoding}
        spec = [r for r in decoding if r.temperature == 0 and r.id in self._hidden]
        drafted: dict[int, TokenTree] = {}
        if spec:
            trees = self.drafter.propose([r.id for r in spec], [pend[r.id][-1] for r in spec],
                                         torch.stack([self._hidden[r.id] for r in spec]))
            drafted = {r.id: t for r, t in zip(spec, trees)}
        local = {r.id: drafted.get(r.id, TokenTree([pend[r.id][-1]], [-1])) for r in decoding}
        while True:  # the rows' inputs, with the drafter's pseudo positions; preempt until they fit
            trees = [_with_prefix(pend[r.id][:-1], local[r.id]) for r in decoding]
            anchors = [list(range(len(pend[r.id]) - 1, len(pend[r.id]) - 1 + len(local[r.id])))
                       if r.temperature == 0 else [] for r in decoding]
            self.drafter.extend(trees, anchors)
            if self.cache.can_fit([r.id for r in decoding], [len(t) for t in trees]):
                break
            if any(len(t) > 1 for t in local.values()):  # first drop the drafts, then preempt
                local = {r.id: TokenTree([pend[r.id][-1]], [-1]) for r in decoding}
                continue
            self._preempt(decoding.pop())
            if not decoding:
                return
        greedy = [r for r in decoding if r.temperature == 0]
        ids_list = [r.id for r in decoding]
        n_new = [len(t) for t in trees]
        pos, _ = self.cache.prepare(ids_list, n_new, device=self.device, dtype=self.dtype, mask=False)
        start = pos[:, 0].cpu()
        ids, pos, tmask = tree_inputs(trees, start, self.dtype)
        tmask = tmask[..., : int((start + torch.tensor(n_new)).max())]  # the keys the cache returns
        seen: list[torch.Tensor] = []
        hook = self.adapter.head().register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
        rows = self.forward_context(decoding) if self.forward_context is not None else contextlib.nullcontext()
        try:
            with self.cache.attach(self.model), rows, self.drafter.forward_context(trees) or contextlib.nullcontext():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=tmask.to(self.device),
                                    position_ids=pos.to(self.device), use_cache=True,
                                    **{self._cache_kw: self.cache}).logits.float()
        finally:
            hook.remove()
        hidden = seen[-1]
        self.peak_blocks = max(self.peak_blocks, self.cache.blocks.capacity - self.cache.num_free_blocks)
        paths, lasts = [], []
        for b, req in enumerate(decoding):
            r0 = len(pend[req.id]) - 1
            tree = local[req.id]
            if req.temperature == 0:
                path, nxt = accept_greedy(tree, logits[b, r0 : r0 + len(tree)])
            else:
                path, nxt = [0], sample_token(logits[b, r0], req.temperature, req.top_p, req.generator)
            paths.append([r0 + j for j in path])
            lasts.append(r0 + path[-1])
            self.spec_draft_tokens += tree.num_candidates
            self.spec_accepted_tokens += len(path) - 1
            self.cache.truncate(req.id, int(start[b]) + r0 + 1)  # keep [accepted last step..., root]
            accepted = [tree.tokens[j] for j in path[1:]] + [nxt]
            self._pending[req.id] = accepted
            self._hidden[req.id] = hidden[b, r0 + path[-1]]
            for tok in accepted:
                self._emit(req, tok, out)
                if req.done:
                    break
        if greedy:
            keep = [i for i, r in enumerate(decoding) if r.temperature == 0]
            self.drafter.observe([decoding[i].id for i in keep], [trees[i] for i in keep], logits[keep],
                                 hidden[keep], [paths[i] for i in keep], [lasts[i] for i in keep])
        for req in decoding:
            if req.done:
                self._forget(req.id)
