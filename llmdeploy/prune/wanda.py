"""Wanda (Sun et al., ICLR 2024): prune by |W_ij| · ‖X_j‖₂, comparing weights within each row.

The score weighs a weight's magnitude by the norm of the input feature it multiplies, over all
calibration tokens; no weight update. As in the paper, unstructured masks compare the weights
of one output row; N:M masks compare each group of M.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compress.base import register_method
from ..compress.engine import LinearStats
from .masks import SparsityPattern, select_mask
from .pruner import WeightPruner


@register_method("wanda")
@dataclass(kw_only=True)
class Wanda(WeightPruner):
    """``Wanda(sparsity=0.5)``: activation-aware magnitude pruning (needs calibration data)."""

    needs_calibration = True

    def prune_weight(self, weight: torch.Tensor, pattern: SparsityPattern,
                     stats: LinearStats | None) -> torch.Tensor:
        assert stats is not None
        # ‖X_j‖₂ = sqrt(Σ_t x_tj²), the diagonal of XᵀX
        norms = stats.xtx.diagonal().clamp_min(0).sqrt().to(weight.device)
        scores = weight.detach().abs().float() * norms.unsqueeze(0)
        return weight.masked_fill(select_mask(scores, pattern, per_row=True), 0)
