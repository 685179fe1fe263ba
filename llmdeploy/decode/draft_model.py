"""Speculative decoding with a draft model (Leviathan et al., 2023; Chen et al., 2023).

A smaller or compressed model sharing the tokenizer drafts ``n_draft`` tokens autoregressively
(greedy at ``temperature == 0``, otherwise sampled from its own distribution at the same
temperature and nucleus, which the engine's rejection sampling corrects exactly). A compressed
copy of the target (ShortGPT/LaCo layers dropped, AQLM, a sliced model) makes this
self-speculation. The draft model keeps its own ragged cache; after verification it is rolled
back to the accepted prefix, and an accepted last draft (never fed to it) is fed with the next root.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .base import Drafter
from .engine import Runner, target_probs
from .tree import TokenTree


class DraftModel(Drafter):
    """Draft with ``model`` (``n_draft`` tokens per step). Not saved with :meth:`save`: save the
    draft model itself (``llmdeploy.save``)."""

    kind = "draft_model"
    acceptance = "rejection"

    def __init__(self, model: nn.Module, n_draft: int = 4) -> None:
        super().__init__()
        if n_draft < 1:
            raise ConfigError(f"n_draft must be >= 1, got {n_draft}")
        self.__dict__["draft"] = model  # not a submodule: the drafter's state is its settings
        self.n_draft = n_draft

    def config(self) -> dict:
        return {"n_draft": self.n_draft}

    def networks(self) -> list[nn.Module]:
        return [self.draft]

    def save(self, path) -> None:
        raise ConfigError("a DraftModel is a model: save it with llmdeploy.save(draft, path) and wrap it again")

    def quantize(self, bits: int = 8, group_size: int = 64) -> DraftModel:
        raise ConfigError("a DraftModel drafts with a whole model: compress that model (e.g. llmdeploy.quant.RTN) "
                          "and wrap it again")

    continuous = False  # its own cache is prefilled with all prompts in begin()

    def begin(self, runner, prompts=None, *, temperature=0.0, top_p=1.0, generator=None) -> None:
        if prompts is None:
            raise ConfigError("a DraftModel needs the prompts up front (decode.generate); "
                              "continuous-batching engines take Medusa, ReDrafter or HiddenTransfer")
        super().begin(runner, prompts, temperature=temperature, top_p=top_p, generator=generator)
        v_t = runner.model.get_output_embeddings().out_features
        v_d = self.draft.get_output_embeddings().out_features
        if v_t != v_d:
            raise ConfigError(f"the draft model's vocabulary ({v_d}) differs from the model's ({v_t}): "
                              "a draft model must share the tokenizer")
        self.runner = Runner(self.draft, len(prompts), capacity=runner.cache.capacity)
        trees = [TokenTree.chain(p) for p in prompts]
        self.runner.forward(trees)
        self.runner.cache.commit([range(len(p)) for p in prompts])
        self.pending: list[list[int]] = [[] for _ in prompts]
        self.keys: list = list(range(len(prompts)))  # the sequence of each row of the draft cache

    def _pick(self, logits: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        if self._temperature == 0:
            return logits.argmax(-1).tolist(), None
        q = target_probs(logits, self._temperature, self._top_p).cpu()
        return torch.multinomial(q, 1, generator=self._gen)[:, 0].tolist(), q

    def propose(self, keys: Sequence, roots: Sequence[int], hidden: torch.Tensor) -> list[TokenTree]:
        if list(keys) != self.keys:
            raise ConfigError("a DraftModel drafts for the rows it was begun with, in order")
        cache = self.runner.cache
        self._before = cache.lengths.clone()
        feed = [self.pending[b] + [r] for b, r in enumerate(roots)]
        drafts: list[list[int]] = [[] for _ in roots]
        qs: list[list[torch.Tensor]] = [[] for _ in roots]
        for step in range(self.n_draft):
            trees = [TokenTree.chain(f) for f in feed]
            logits, _ = self.runner.forward(trees)
            cache.commit([range(len(f)) for f in feed])
            last = logits[torch.arange(len(feed)), torch.tensor([len(f) - 1 for f in feed])]
            toks, q = self._pick(last)
            for b, t in enumerate(toks):
                drafts[b].append(t)
                if q is not None:
                    qs[b].append(q[b])
            if step < self.n_draft - 1:
                feed = [[t] for t in toks]
        trees = []
        for b, r in enumerate(roots):
            tree = TokenTree.chain([r] + drafts[b])
            tree.q = dict(enumerate(qs[b]))
            trees.append(tree)
        return trees

    def observe(self, keys, trees, logits, hidden, paths, lasts, *, prefill: bool = False) -> None:
        if prefill:  # begin() prefilled the draft model itself
            return
        cache = self.runner.cache
        for b, path in enumerate(paths):
            accepted = len(path) - 1  # drafts accepted (all fed to the draft model but the last)
            fed = len(self.pending[b]) + 1 + min(accepted, self.n_draft - 1)
            cache.lengths[b] = self._before[b] + fed
            self.pending[b] = [trees[b].tokens[self.n_draft]] if accepted == self.n_draft else []

    def release(self, keys: Sequence) -> None:
        gone = set(keys)
        rows = [r for r, k in enumerate(self.keys) if k not in gone]
        self.runner.cache.select(rows)
        self.pending = [self.pending[r] for r in rows]
        self.keys = [self.keys[r] for r in rows]
