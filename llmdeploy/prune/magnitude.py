"""Magnitude pruning: zero the weights of smallest absolute value, per layer.

The simplest baseline (no calibration data): an unstructured mask compares all weights of a
layer; an N:M mask compares the M weights of each group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compress.base import register_method
from ..compress.engine import LinearStats
from .masks import SparsityPattern, select_mask
from .pruner import WeightPruner


@register_method("magnitude")
@dataclass(kw_only=True)
class Magnitude(WeightPruner):
    """``Magnitude(sparsity=0.5)`` or ``Magnitude(pattern="2:4")``: |W|-based pruning."""

    def prune_weight(self, weight: torch.Tensor, pattern: SparsityPattern,
                     stats: LinearStats | None) -> torch.Tensor:
        mask = select_mask(weight.detach().abs().float(), pattern)
        return weight.masked_fill(mask, 0)
