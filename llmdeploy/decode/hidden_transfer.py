"""Parallel decoding via hidden transfer (Wu et al., 2024).

Trained linear maps ``T_i`` (i = 1..n_future) turn the hidden state of a token at the input of
block ``layer`` into *pseudo* hidden states of the ``i``-th future position: ``h~_{t+i} = T_i h_t``.
The pseudo states replace placeholder positions at that layer and then pass through the remaining
blocks with the real tokens (attending to the context, to the anchor's path and to earlier pseudo
positions of the same anchor, never seen by real tokens), so the draft for position ``t + i + 1``
benefits from ``L - layer`` blocks of the model itself; the final norm and LM head give it.

Drafting costs no extra forward: every verification forward hangs a chain of ``n_future`` pseudo
positions under each candidate node, and the chain under the node that ends up accepted gives the
next step's drafts, whose top-ranked tokens form the next tree (the same sparse trees as Medusa's).
``pseudo_on="main"`` (our variant, for hardware where every position costs, such as CPUs) hangs
chains only under the root and its chain of first-ranked candidates — ``n_future`` × (depth + 1)
pseudo positions instead of ``n_future`` × (nodes + 1); when the accepted path leaves that chain,
the next step verifies the bare root (one plain step) and drafting resumes after it.
There is no public code; choices made here (documented deviations where the paper is silent or
unclear to us): one map per future position applied to the anchor's own hidden state, ``T_i``
initialised to the identity, trained with the cross-entropy of the pseudo positions' predictions
against the model's own distribution at those positions (or its greedy tokens) on the model's own
continuations, the model frozen; ``layer`` defaults to ``3L/4``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..models import get_adapter
from .base import Drafter, RankedTreeMixin, distill_loss, register_drafter
from .tree import TokenTree, tree_from_choices, tree_inputs


@register_drafter
class HiddenTransfer(RankedTreeMixin, Drafter):
    """Hidden-transfer drafter: ``n_future`` maps at the input of block ``layer``."""

    kind = "hidden_transfer"
    acceptance = "typical"

    def __init__(self, hidden_size: int, layer: int, n_future: int = 3, *,
                 tree: int | Sequence[Sequence[int]] = 16, topk: int = 8, pseudo_on: str = "all") -> None:
        super().__init__()
        if n_future < 1 or layer < 0:
            raise ConfigError(f"hidden transfer needs n_future >= 1 and layer >= 0, got {n_future}, {layer}")
        if pseudo_on not in ("all", "main"):
            raise ConfigError(f"pseudo_on must be 'all' or 'main', got {pseudo_on!r}")
        self.pseudo_on = pseudo_on
        self.hidden_size, self.layer, self.n_future = hidden_size, layer, n_future
        self.transfer = nn.Parameter(torch.eye(hidden_size).repeat(n_future, 1, 1))
        self._init_tree(n_future, tree, topk)
        self._slots: list[tuple[int, int, int, int]] = []  # (row, node, anchor, i) of the next forward
        self._next: dict = {}  # key -> ranked drafts (n_future, topk) for its next step

    @classmethod
    def for_model(cls, model: nn.Module, layer: int | None = None, n_future: int = 3, **kw) -> HiddenTransfer:
        n = len(get_adapter(model).blocks())
        layer = (3 * n) // 4 if layer is None else layer
        if not 0 <= layer < n:
            raise ConfigError(f"layer must be in [0, {n}) for this model, got {layer}")
        return cls(model.get_output_embeddings().in_features, layer, n_future, **kw)

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "layer": self.layer, "n_future": self.n_future,
                "tree": self.tree, "topk": self.topk, "pseudo_on": self.pseudo_on}

    # --- pseudo positions ------------------------------------------------------------------------
    def extend(self, trees: Sequence[TokenTree], anchors: Sequence[Sequence[int]]) -> None:
        """Hang a chain of ``n_future`` pseudo positions under each anchor (``pseudo_on="main"``:
        only under the subtree's root and its chain of first-ranked candidates)."""
        self._slots = []
        for b, (tree, nodes) in enumerate(zip(trees, anchors)):
            if self.pseudo_on == "main" and nodes:
                allowed, chain, node = set(nodes), [nodes[0]], nodes[0]
                while True:
                    node = next((j for j in range(node + 1, len(tree)) if tree.parents[j] == node and j in allowed), None)
                    if node is None:
                        break
                    chain.append(node)
                nodes = chain
            for a in nodes:
                parent = a
                for i in range(self.n_future):
                    parent = tree.add(tree.tokens[a], parent, pseudo=True)
                    self._slots.append((b, parent, a, i))

    def _hook(self, slots):
        rows = torch.tensor([s[0] for s in slots])
        nodes = torch.tensor([s[1] for s in slots])
        anchors = torch.tensor([s[2] for s in slots])
        which = torch.tensor([s[3] for s in slots])

        def pre_hook(_module, args, kwargs):
            key = "hidden_states" if "hidden_states" in kwargs else None
            h = kwargs[key] if key else args[0]
            src = h[rows, anchors]  # (S, d), at this block's input
            maps = self.transfer[which].to(h.dtype)  # (S, d, d)
            h = h.clone()
            h[rows, nodes] = torch.bmm(maps, src[:, :, None])[:, :, 0]
            if key:
                kwargs = {**kwargs, key: h}
                return args, kwargs
            return (h, *args[1:]), kwargs

        return pre_hook

    @contextlib.contextmanager
    def _replacing(self, model: nn.Module, slots):
        block = get_adapter(model).blocks()[self.layer]
        handle = block.register_forward_pre_hook(self._hook(slots), with_kwargs=True) if slots else None
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    def forward_context(self, trees: Sequence[TokenTree]):
        return self._replacing(self._runner.model, self._slots)

    def observe(self, keys, trees, logits, hidden, paths, lasts, *, prefill: bool = False) -> None:
        for b, (key, tree, last) in enumerate(zip(keys, trees, lasts)):
            chain, node = [], last
            for _ in range(self.n_future):
                node = next((j for j in range(node + 1, len(tree)) if tree.parents[j] == node and tree.pseudo[j]), None)
                if node is None:
                    break
                chain.append(node)
            if len(chain) < self.n_future:  # no pseudo positions under that node in this forward
                self._next.pop(key, None)
                continue
            self._next[key] = logits[b, chain].topk(self.topk, dim=-1).indices.cpu()

    def release(self, keys: Sequence) -> None:
        for k in keys:
            self._next.pop(k, None)

    def propose(self, keys: Sequence, roots: Sequence[int], hidden: torch.Tensor) -> list[TokenTree]:
        """The tree from the drafts the last forward left for each key (a bare root when there
        are none yet, e.g. after a prefill without pseudo positions)."""
        choices = self.choices()
        return [tree_from_choices(r, self._next[k], choices) if k in self._next else TokenTree([int(r)], [-1])
                for k, r in zip(keys, roots)]

    # --- training -------------------------------------------------------------------------------
    def forward_train(self, model: nn.Module, tokens: torch.Tensor, anchors: Sequence[int]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward without a cache of each row of ``tokens`` (B, S) with pseudo positions hung
        under each anchor: the real tokens' logits (B, S, V) and the pseudo positions' (B,
        len(anchors), n_future, V), differentiable in ``transfer``."""
        trees = [TokenTree.chain(row) for row in tokens.tolist()]
        self.extend(trees, [list(anchors)] * len(trees))
        ids, pos, mask = tree_inputs(trees, torch.zeros(len(trees), dtype=torch.long), next(model.parameters()).dtype)
        dev = next(model.parameters()).device
        with self._replacing(model, self._slots):
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                           use_cache=False).logits
        S = tokens.shape[1]
        pseudo = logits[:, S:].float()  # extend() appended the chains in anchor order
        return logits[:, :S].float(), pseudo.reshape(len(trees), len(anchors), self.n_future, -1)

    def future_logits(self, model: nn.Module, tokens: torch.Tensor, anchors: Sequence[int]) -> torch.Tensor:
        """(B, len(anchors), n_future, V): the pseudo positions' predictions."""
        return self.forward_train(model, tokens, anchors)[1]

    def training_loss(self, model: nn.Module, tokens: torch.Tensor, anchors: Sequence[int], soft: bool = True
                      ) -> torch.Tensor:
        """Mean cross-entropy of pseudo position ``i`` under anchor ``a`` against the model's
        distribution for position ``a + 1 + i`` (``soft``; computed in the same forward) or its
        token ``tokens[a + 1 + i]`` (anchors need ``a + n_future + 1 < S``)."""
        real, pseudo = self.forward_train(model, tokens, anchors)
        idx = torch.tensor(anchors)[:, None] + 2 + torch.arange(self.n_future)[None, :]
        if soft:
            targets = torch.softmax(real[:, idx - 1].detach(), dim=-1)  # (B, A, n, V)
        else:
            targets = tokens[:, idx]  # (B, A, n)
        return distill_loss(pseudo, targets)
