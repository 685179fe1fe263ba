"""One verification engine for every drafter: propose a token tree, verify it in one forward,
keep the accepted path.

Each step, for every unfinished row, the drafter proposes a :class:`~.tree.TokenTree` rooted at the
row's decided-but-uncached token; one forward of the model over all rows' trees (4-D tree mask,
per-node position ids, ragged per-row cache) gives the model's next-token distribution after every
node; the acceptance rule walks the tree:

- ``temperature == 0``: greedy — follow the child equal to the model's argmax while there is one.
  The output is exactly plain greedy decoding's (up to floating-point ties), whatever the drafter.
- ``acceptance="rejection"`` (draft models, ReDrafter at ``temperature > 0``): multi-candidate
  speculative sampling (Leviathan et al. 2023; SpecInfer's form for trees) — at a node, each drafted
  child ``x`` (as often as it was drawn from the drafter's ``q``) is accepted with probability
  ``min(1, p(x)/q(x))`` in the order drafts were drawn, after a rejection ``p <- norm(max(p - q, 0))``;
  when no child is accepted
  the next token is drawn from what is left of ``p``. Every token is distributed exactly as the
  model's ``p`` (softmax at ``temperature``, nucleus ``top_p``).
- ``acceptance="typical"`` (Medusa, hidden transfer at ``temperature > 0``): Medusa-2's typical
  acceptance — a candidate passes when ``p(x) > min(epsilon, delta * exp(-H(p)))`` and the longest
  passing path wins; the next token is sampled from ``p``. Not exact by design (the paper's trade).

The accepted nodes' keys and values are compacted in the cache (:meth:`.cache.TreeCache.commit`)
and the next token (the model's own choice after the accepted path) becomes the next root, so every
step yields ``accepted + 1`` tokens for one forward.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..kernels.rows import few_row_linears
from ..kv.engine import cache_kwarg
from ..models import get_adapter
from .attention import folded_gqa
from .cache import TreeCache
from .tree import TokenTree, tree_inputs

log = logging.getLogger(__name__)


class Runner:
    """A model with a :class:`TreeCache`: runs tree forwards, returns logits and the hidden states
    the LM head sees (any model the library adapts: dense, quantized, sliced, pruned)."""

    def __init__(self, model: torch.nn.Module, batch: int, capacity: int = 256) -> None:
        self.model = model
        self.adapter = get_adapter(model)
        self.cache = TreeCache(batch, capacity)
        self.cache_kw = cache_kwarg(model)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    @torch.no_grad()
    def forward(self, trees: Sequence[TokenTree], context: contextlib.AbstractContextManager | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab) in float32 and last hidden states (B, T, d) at every node."""
        ids, pos, mask = tree_inputs(trees, self.cache.lengths, self.dtype)
        seen: list[torch.Tensor] = []
        hook = self.adapter.head().register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            with context or contextlib.nullcontext():
                out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                 position_ids=pos.to(self.device), use_cache=True, **{self.cache_kw: self.cache})
        finally:
            hook.remove()
        return out.logits.float(), seen[-1]


def target_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """softmax(logits / temperature) restricted to the nucleus ``top_p`` (last dim), renormalised."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        p, idx = probs.sort(dim=-1, descending=True)
        keep = (p.cumsum(-1) - p) < top_p
        probs = torch.zeros_like(probs).scatter_(-1, idx, p * keep)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def accept_greedy(tree: TokenTree, logits: torch.Tensor) -> tuple[list[int], int]:
    """(accepted path of node indices from the root, next token) under greedy verification."""
    best = logits[: len(tree)].argmax(-1).tolist()
    node, path = 0, [0]
    while True:
        nxt = next((c for c in tree.children(node) if tree.tokens[c] == best[node]), None)
        if nxt is None:
            return path, best[node]
        node = nxt
        path.append(node)


def accept_typical(tree: TokenTree, probs: torch.Tensor, generator: torch.Generator, *,
                   epsilon: float = 0.09, delta: float = 0.3) -> tuple[list[int], int]:
    """Medusa-2's typical acceptance: the longest path whose every candidate ``x`` has
    ``p(x) > min(epsilon, delta * exp(-entropy(p)))`` under its parent's ``p``; next token sampled."""
    p = probs[: len(tree)]
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    thr = torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy))
    ok = [True] * len(tree)
    best = 0
    depth = tree.depths()
    for i in range(1, len(tree)):
        if tree.pseudo[i]:
            ok[i] = False
            continue
        par = tree.parents[i]
        ok[i] = ok[par] and bool(p[par, tree.tokens[i]] > thr[par])
        if ok[i] and depth[i] > depth[best]:
            best = i
    path = tree.path(best)
    return path, int(torch.multinomial(p[best], 1, generator=generator))


def accept_rejection(tree: TokenTree, probs: torch.Tensor, generator: torch.Generator) -> tuple[list[int], int]:
    """Exact multi-candidate speculative sampling over ``tree`` (see the module docstring); needs
    ``tree.q[node]``, the distribution the drafter drew ``node``'s children from."""
    node, path = 0, [0]
    while True:
        p = probs[node].clone()
        kids = tree.children(node)
        moved = False
        if kids:
            q = tree.q.get(node)
            if q is None:
                raise ConfigError("rejection sampling needs the drafter's distribution of every node with children "
                                  "(tree.q): this drafter proposes without one; use acceptance='typical'")
            q = q.to(p)
            for c in tree.draws.get(node, kids):  # in draw order, once per draw
                x = tree.tokens[c]
                u = torch.rand((), generator=generator)
                if q[x] > 0 and u * q[x] <= p[x]:  # accept with probability min(1, p/q)
                    node, moved = c, True
                    break
                p = (p - q).clamp_min(0)
                s = p.sum()
                p = p / s if s > 0 else probs[node].clone()  # s == 0 only when p == q (never rejects)
        if not moved:
            return path, int(torch.multinomial(p, 1, generator=generator))
        path.append(node)


@dataclass
class DecodeStats:
    """What a generation did: per verification step and row, tokens produced (accepted drafts + 1),
    candidates verified, and positions in the forward (root, candidates and any pseudo positions
    a drafter adds); wall seconds."""

    tokens_per_step: list[int] = field(default_factory=list)
    candidates_per_step: list[int] = field(default_factory=list)
    positions_per_step: list[int] = field(default_factory=list)
    forwards: int = 0
    seconds: float = 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean tokens produced per row per verification step (1.0 for plain decoding)."""
        return sum(self.tokens_per_step) / max(1, len(self.tokens_per_step))

    @property
    def mean_tree(self) -> float:
        """Mean candidates verified per row per step (0 for plain decoding)."""
        return sum(self.candidates_per_step) / max(1, len(self.candidates_per_step))

    @property
    def mean_positions(self) -> float:
        """Mean positions per row in each verification forward (1 for plain decoding)."""
        return sum(self.positions_per_step) / max(1, len(self.positions_per_step))


@dataclass
class GenerationResult:
    sequences: list[list[int]]  # the new tokens of each prompt
    texts: list[str] | None
    stats: DecodeStats


def _tokenize(tokenizer, prompts) -> list[list[int]]:
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ConfigError("text prompts need a tokenizer; pass one or give token ids")
            out.append(tokenizer(p, add_special_tokens=False)["input_ids"])
        else:
            out.append([int(t) for t in p])
        if not out[-1]:
            raise ConfigError("every prompt needs at least one token")
    return out


def generate(model: torch.nn.Module, tokenizer, prompts: Sequence[str | Sequence[int]], max_new_tokens: int, *,
             drafter=None, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = 0,
             eos_token_id: int | Sequence[int] | None = None, acceptance: str | None = None,
             typical_epsilon: float = 0.09, typical_delta: float = 0.3, row_kernel: bool = True) -> GenerationResult:
    """Generate ``max_new_tokens`` after each prompt (texts, or token-id lists), batched, with
    ``drafter`` proposing candidates (None: plain decoding, one token per forward).

    ``temperature == 0`` decodes greedily and losslessly; above it, ``acceptance`` picks
    ``"rejection"`` (exact; drafters that sample) or ``"typical"`` (Medusa-2), defaulting to the
    drafter's own. ``eos_token_id`` (default: the tokenizer's) ends a row early.

    ``row_kernel``: the model's and the drafter's fp32 CPU ``nn.Linear`` layers compute inputs of
    up to :data:`llmdeploy.kernels.rows.MAX_ROWS` (48) token rows with :func:`llmdeploy.kernels.rows.linear_rows`, which reads each weight
    once (BLAS's GEMM path makes a tree of a few tokens cost several times one token) and computes
    every row exactly as it would alone (a node's projections do not depend on the tree around
    it). Off: plain ``F.linear`` everywhere.

    Models attending with transformers' ``"sdpa"`` attend through
    :func:`llmdeploy.decode.attention.folded_gqa` meanwhile: a grouped-query model's tree forwards
    read the cache's key/value heads in place instead of a copy per query head (same numbers).
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
    ids = _tokenize(tokenizer, prompts)
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    stops = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    mode = "greedy"
    if temperature > 0:
        mode = acceptance or (drafter.acceptance if drafter is not None else "rejection")
        if mode not in ("typical", "rejection"):
            raise ConfigError(f"acceptance must be 'typical' or 'rejection', got {mode!r}")
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    networks = [model, *(drafter.networks() if drafter is not None else [])]
    with contextlib.ExitStack() as stack:
        stack.enter_context(folded_gqa(*networks))
        if row_kernel:
            for m in networks:
                stack.enter_context(few_row_linears(m))
        return _generate(model, tokenizer, ids, max_new_tokens, drafter, mode, temperature, top_p, gen, stops,
                         typical_epsilon, typical_delta)


def _generate(model, tokenizer, ids, max_new_tokens, drafter, mode, temperature, top_p, gen, stops,
              typical_epsilon, typical_delta) -> GenerationResult:
    t0 = time.perf_counter()
    B = len(ids)
    runner = Runner(model, B, capacity=max(len(p) for p in ids) + max_new_tokens + 64)
    if drafter is not None:
        drafter.begin(runner, ids, temperature=temperature, top_p=top_p, generator=gen)
    stats = DecodeStats()
    outputs: list[list[int]] = [[] for _ in range(B)]
    active = list(range(B))  # prompt index of each cache row

    def choose(tree: TokenTree, logits: torch.Tensor) -> tuple[list[int], int]:
        if mode == "greedy":
            return accept_greedy(tree, logits)
        probs = target_probs(logits[: len(tree)], temperature, top_p)
        if mode == "typical":
            return accept_typical(tree, probs, gen, epsilon=typical_epsilon, delta=typical_delta)
        return accept_rejection(tree, probs, gen)

    def emit(i: int, toks: list[int]) -> bool:
        """Append to prompt ``i``'s output up to its end; True when it has ended."""
        for t in toks:
            outputs[i].append(t)
            if t in stops or len(outputs[i]) >= max_new_tokens:
                return True
        return False

    # prefill: each prompt is a chain; the last node gives the first token
    trees = [TokenTree.chain(p) for p in ids]
    lasts = [len(p) - 1 for p in ids]
    if drafter is not None:
        drafter.extend(trees, [[n] for n in lasts])
    ctx = drafter.forward_context(trees) if drafter is not None else None
    logits, hidden = runner.forward(trees, ctx)
    stats.forwards += 1
    runner.cache.commit([range(len(p)) for p in ids])
    roots, finished = [], []
    for b, tree in enumerate(trees):
        _, tok = choose(TokenTree([tree.tokens[lasts[b]]], [-1]), logits[b, lasts[b]:lasts[b] + 1])
        roots.append(tok)
        finished.append(emit(b, [tok]))
    if drafter is not None:
        drafter.observe(active, trees, logits, hidden, [tree.path(n) for tree, n in zip(trees, lasts)], lasts,
                         prefill=True)
    h_last = hidden[torch.arange(B), torch.tensor(lasts)]

    while True:
        keep_rows = [r for r in range(len(active)) if not finished[r]]
        if not keep_rows:
            break
        if len(keep_rows) < len(active):
            runner.cache.select(keep_rows)
            if drafter is not None:
                drafter.release([active[r] for r in range(len(active)) if finished[r]])
            active = [active[r] for r in keep_rows]
            roots = [roots[r] for r in keep_rows]
            h_last = h_last[torch.tensor(keep_rows)]
        if drafter is None:
            trees = [TokenTree.chain([r]) for r in roots]
        else:
            trees = drafter.propose(active, roots, h_last)
            drafter.extend(trees, [[i for i in range(len(t)) if not t.pseudo[i]] for t in trees])
        ctx = drafter.forward_context(trees) if drafter is not None else None
        logits, hidden = runner.forward(trees, ctx)
        stats.forwards += 1
        paths, lasts, roots, finished = [], [], [], []
        for b, tree in enumerate(trees):
            path, nxt = choose(tree, logits[b])
            paths.append(path)
            lasts.append(path[-1])
            roots.append(nxt)
            stats.tokens_per_step.append(len(path))
            stats.candidates_per_step.append(tree.num_candidates)
            stats.positions_per_step.append(len(tree))
            finished.append(emit(active[b], [tree.tokens[n] for n in path[1:]] + [nxt]))
        runner.cache.commit(paths)
        if drafter is not None:
            drafter.observe(active, trees, logits, hidden, paths, lasts)
        h_last = hidden[torch.arange(len(trees)), torch.tensor(lasts)]
    stats.seconds = time.perf_counter() - t0
    texts = [tokenizer.decode(o) for o in outputs] if tokenizer is not None else None
    return GenerationResult(outputs, texts, stats)
