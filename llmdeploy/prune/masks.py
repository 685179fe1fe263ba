"""Sparsity patterns and exact mask selection, shared by every weight-pruning method.

A pattern is either *unstructured* (a fraction ``sparsity`` of the weights is zero) or *N:M*
(in every run of M consecutive weights along a row, N are kept and M − N are zero, e.g. 2:4).
Masks are exact: an unstructured layer of ``numel`` weights loses exactly
``round(sparsity · numel)`` of them (ties are broken by index, never by a threshold that could
take more), and an N:M layer has exactly M − N zeros in every group.
Masks here are boolean tensors where ``True`` marks a weight to prune.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class SparsityPattern:
    """``sparsity`` for unstructured masks; ``n`` kept of every ``m`` for N:M (``m == 0``: none)."""

    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.sparsity:.0%} unstructured"


def parse_pattern(pattern: str, sparsity: float | None) -> SparsityPattern:
    """Check ``pattern`` ("unstructured" or "N:M") against ``sparsity`` and return the pattern."""
    if pattern == "unstructured":
        if sparsity is None or not 0.0 <= float(sparsity) < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1) for unstructured pruning, got {sparsity!r}")
        return SparsityPattern(float(sparsity))
    match = re.fullmatch(r"(\d+):(\d+)", str(pattern))
    if not match:
        raise ConfigError(f"pattern must be 'unstructured' or 'N:M' such as '2:4', got {pattern!r}")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m or m > 256:
        raise ConfigError(f"pattern {pattern!r}: need 0 < N < M <= 256 (N weights kept of every M)")
    implied = 1.0 - n / m
    if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
        raise ConfigError(
            f"pattern {pattern!r} keeps {n} of every {m} weights, i.e. sparsity {implied:g}, but "
            f"sparsity={sparsity} was given; pass sparsity={implied:g} (or None) with this pattern, "
            "or pattern='unstructured'"
        )
    return SparsityPattern(implied, n, m)


def n_pruned(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights an exact mask at ``sparsity`` removes."""
    return int(round(sparsity * numel))


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of exactly the ``k`` lowest scores of the whole tensor."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.flatten(), k, largest=False).indices] = True
    return mask.view_as(scores)


def lowest_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask pruning the lowest scores of each row; the layer total is exact (rows differ by at
    most one pruned weight when ``sparsity · numel`` is not a multiple of the row count)."""
    rows, cols = scores.shape
    k = n_pruned(rows * cols, sparsity)
    counts = torch.full((rows,), k // rows, device=scores.device)
    counts[: k % rows] += 1
    ranks = torch.argsort(torch.argsort(scores, dim=1, stable=True), dim=1, stable=True)
    return ranks < counts.unsqueeze(1)


def lowest_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask pruning the ``m − n`` lowest scores in every group of ``m`` consecutive columns."""
    rows, cols = scores.shape
    if cols % m:
        raise ConfigError(f"{cols} columns are not divisible into groups of {m} for an N:M pattern")
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def select_mask(scores: torch.Tensor, pattern: SparsityPattern, *, per_row: bool = False) -> torch.Tensor:
    """The exact mask of ``pattern`` over ``scores`` (lower = pruned first).

    Unstructured masks compare the whole layer, or each output row when ``per_row`` (Wanda's
    comparison group).
    """
    if pattern.structured:
        return lowest_n_of_m(scores, pattern.n, pattern.m)
    if per_row:
        return lowest_per_row(scores, pattern.sparsity)
    return lowest_k(scores, n_pruned(scores.numel(), pattern.sparsity))


def check_divisible(name: str, in_features: int, pattern: SparsityPattern) -> None:
    """N:M groups run along the input dimension: it must be a multiple of M."""
    if pattern.structured and in_features % pattern.m:
        raise ConfigError(
            f"{name}: in_features={in_features} is not a multiple of M={pattern.m}, so the "
            f"{pattern.n}:{pattern.m} pattern cannot tile its rows; use another M or "
            "pattern='unstructured'"
        )
