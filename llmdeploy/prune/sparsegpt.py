"""SparseGPT (Frantar & Alistarh, ICML 2023): one-shot pruning with the OBS weight update.

For a layer with weight W and calibration inputs X, SparseGPT minimises ‖(W − Ŵ)X‖² over
sparse Ŵ. It walks the columns left to right; when column i loses the weights of its mask, the
error is spread over the not-yet-processed columns with the inverse Hessian H⁻¹ = (XᵀX + λI)⁻¹
(the Optimal Brain Surgeon update), through the upper Cholesky factor of H⁻¹ as in GPTQ, with
lazy batched updates every ``blocksize`` columns. The mask is chosen adaptively per block of
columns by the OBS saliency w² / [H⁻¹]ᵢᵢ²; for N:M patterns per group of M columns when the
walk reaches the group. Masks are exact (see :mod:`llmdeploy.prune.masks`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..compress.base import register_method
from ..compress.engine import LinearStats
from ..compress.hessian import inverse_hessian_factor
from ..errors import ConfigError, TrainingDivergedError
from .masks import SparsityPattern, lowest_k, lowest_n_of_m, n_pruned
from .pruner import WeightPruner

log = logging.getLogger(__name__)


def sparsegpt_prune(
    weight: torch.Tensor,
    xtx: torch.Tensor,
    pattern: SparsityPattern,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    hinv: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prune ``weight`` (out, in) to ``pattern`` given ``xtx = XᵀX`` of its inputs; returns the
    pruned and OBS-updated weight (same dtype). ``hinv`` may pass a precomputed
    :func:`inverse_hessian_factor`."""
    device = xtx.device
    W = weight.detach().to(device=device, dtype=torch.float32).clone()
    rows, cols = W.shape
    U = (inverse_hessian_factor(xtx, percdamp) if hinv is None else hinv).to(torch.float32)
    if pattern.structured:  # groups of M must not straddle two lazy-update blocks
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        if pattern.structured:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            k = n_pruned(rows * i2, pattern.sparsity) - n_pruned(rows * i1, pattern.sparsity)
            mask1 = lowest_k(W1.square() / d.square(), min(k, W1.numel()))
        for i in range(i2 - i1):
            if pattern.structured and i % pattern.m == 0:
                j = i + pattern.m
                mask1[:, i:j] = lowest_n_of_m(W1[:, i:j].square() / d[i:j].square(), pattern.n, pattern.m)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if not torch.isfinite(W).all():
        raise TrainingDivergedError("SparseGPT produced non-finite weights; raise percdamp")
    return W.to(device=weight.device, dtype=weight.dtype)


@register_method("sparsegpt")
@dataclass(kw_only=True)
class SparseGPT(WeightPruner):
    """``SparseGPT(sparsity=0.5, blocksize=128, percdamp=0.01)``: Hessian-based pruning with
    the OBS update of the remaining weights (needs calibration data)."""

    needs_calibration = True
    blocksize: int = 128
    percdamp: float = 0.01

    def validate(self, model) -> None:
        super().validate(model)
        if self.blocksize < 1:
            raise ConfigError(f"blocksize must be >= 1, got {self.blocksize}")
        if not self.percdamp > 0:
            raise ConfigError(f"percdamp must be > 0 (the Hessian may be singular), got {self.percdamp}")

    def prune_weight(self, weight: torch.Tensor, pattern: SparsityPattern,
                     stats: LinearStats | None) -> torch.Tensor:
        assert stats is not None
        return sparsegpt_prune(weight, stats.xtx, pattern, blocksize=self.blocksize, percdamp=self.percdamp)
