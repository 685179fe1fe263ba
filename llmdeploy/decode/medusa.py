"""Medusa heads (Cai et al., 2024): extra decoding heads on the model's last hidden state.

Head ``k`` (k = 1..K) maps the hidden state ``h`` at the position that predicted the current root
to the token ``k`` places after the root: ``lm_head(h + SiLU(W_k h + b_k))`` — one residual SiLU
block per head, the model's own LM head shared (Medusa-1's cheap variant: a head costs ``d^2 + d``
parameters, 332k on SmolLM2-135M, not a vocabulary-sized matrix). ``W_k`` starts at zero, so an
untrained head predicts what the model predicts next (as in the reference). Candidates are the
top-ranked tokens of each head arranged in a sparse tree chosen for the measured per-rank accuracy
(:func:`~.tree.best_tree`); drafting runs only the heads the tree reaches (a tree ``d`` levels
deep computes ``d`` heads' logits, not all K). Trained with the summed cross-entropy of the heads,
head ``k`` weighted ``0.8^(k-1)``, on the model's own continuations (:mod:`.train`), the base frozen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Drafter, DraftVocabMixin, RankedTreeMixin, distill_loss, register_drafter
from .tree import TokenTree, tree_from_choices


class ResBlock(nn.Module):
    """``x + SiLU(W x + b)``."""

    def __init__(self, dim: int, zero: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        if zero:
            nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


@register_drafter
class MedusaHeads(DraftVocabMixin, RankedTreeMixin, Drafter):
    """``n_heads`` Medusa heads for a model of width ``hidden_size`` (see the module docstring).

    ``tree``: the number of candidate nodes (the best tree for the measured accuracy) or explicit
    Medusa choices (tuples of ranks); ``topk``: ranks considered per head; ``draft_vocab``: the
    size of a drafting vocabulary set by :meth:`set_draft_vocab` (0: the whole vocabulary)."""

    kind = "medusa"
    acceptance = "typical"

    def __init__(self, hidden_size: int, n_heads: int = 4, *, tree: int | Sequence[Sequence[int]] = 16,
                 topk: int = 8, n_layers: int = 1, draft_vocab: int = 0) -> None:
        super().__init__()
        self.hidden_size, self.n_heads, self.n_layers = hidden_size, n_heads, n_layers
        self.heads = nn.ModuleList(nn.Sequential(*[ResBlock(hidden_size) for _ in range(n_layers)])
                                   for _ in range(n_heads))
        self._init_tree(n_heads, tree, topk)
        self._init_draft_vocab(draft_vocab)

    @classmethod
    def for_model(cls, model: nn.Module, n_heads: int = 4, **kw) -> MedusaHeads:
        return cls(model.get_output_embeddings().in_features, n_heads, **kw)

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "n_heads": self.n_heads, "tree": self.tree,
                "topk": self.topk, "n_layers": self.n_layers, "draft_vocab": self._draft_vocab_size()}

    def features(self, h: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """(..., d) -> (..., n, d): what each of the first ``n`` heads (default all) hands to the LM head."""
        return torch.stack([head(h) for head in self.heads[:n]], dim=-2)

    def head_logits(self, lm_head: nn.Module, h: torch.Tensor, draft: bool = False, n: int | None = None
                    ) -> torch.Tensor:
        """(..., n, V) logits of the first ``n`` heads (default all; ``draft``: over the drafting vocabulary)."""
        feats = self.features(h.to(self.compute_dtype()), n).to(h.dtype)
        return self.draft_logits(lm_head, feats) if draft else lm_head(feats).float()

    @torch.no_grad()
    def propose(self, keys: Sequence, roots: Sequence[int], hidden: torch.Tensor) -> list[TokenTree]:
        choices = self.choices()
        depth = max((len(c) for c in choices), default=0)  # heads below the tree's depth are not run
        if depth == 0:  # an empty tree: verify the root alone
            return [TokenTree([int(r)], [-1]) for r in roots]
        logits = self.head_logits(self._runner.adapter.head(), hidden, draft=True, n=depth)  # (B, depth, V')
        top = self.vocab_ids(logits.topk(min(self.topk, logits.shape[-1]), dim=-1).indices).cpu()
        return [tree_from_choices(r, top[b], choices) for b, r in enumerate(roots)]

    def training_loss(self, lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, draft: bool = False
                      ) -> torch.Tensor:
        """``hidden`` (N, d) at anchors; ``targets`` for positions 1..K after each anchor's next
        token: ids (N, K), or the model's probabilities there (N, K, V) for soft distillation.
        The 0.8^(k-1)-weighted sum of the heads' cross-entropies (Medusa's weighting). ``draft``:
        logits over the drafting vocabulary (probabilities over it too; an id outside it is no target)."""
        logits = self.head_logits(lm_head, hidden, draft=draft)
        if draft and not targets.is_floating_point():
            targets = self.subset_index(targets)
        w = 0.8 ** torch.arange(self.n_heads, dtype=torch.float32)
        return sum(w[k] * distill_loss(logits[:, k], targets[:, k]) for k in range(self.n_heads))

    def future_logits(self, lm_head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """(N, K, V) predictions for positions 1..K after the next token (for accuracy)."""
        return self.head_logits(lm_head, hidden)
