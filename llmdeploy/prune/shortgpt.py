"""ShortGPT (Men et al., 2024): remove the layers that change the hidden states least.

Block Influence of layer i: ``BI_i = 1 - E_t[cos(x_i,t, x_{i+1},t)]``, the mean over calibration
tokens of one minus the cosine similarity between the layer's input and output hidden states.
The ``n_remove`` layers with the lowest BI are dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..compress.base import Compressor, register_method
from ..compress.engine import run_blockwise
from ..errors import ConfigError
from ..models.adapters import get_adapter
from .layers import LayerReport, remove_layers

log = logging.getLogger(__name__)


def block_influence(model: nn.Module, calib: torch.Tensor, batch_size: int = 8,
                    key: dict | None = None) -> list[float]:
    """BI of every decoder layer on the calibration windows (through the calibration engine;
    with ``key``, the walk can be checkpointed and resumed like any other)."""
    carry: dict = {"scores": []}

    def process(ctx) -> None:
        outs = ctx.forward()
        sims = torch.cat([F.cosine_similarity(x.float(), y.float(), dim=-1).flatten().double()
                          for x, y in zip(ctx.inputs, outs)])
        outs.release()
        total = ctx.reduce(torch.stack([sims.sum(), torch.tensor(float(sims.numel()), dtype=torch.float64)]))
        ctx.carry["scores"] = [*ctx.carry["scores"], 1.0 - float(total[0] / total[1])]

    run_blockwise(model, calib, process, batch_size=batch_size, desc="block influence", key=key, carry=carry)
    return list(carry["scores"])


@register_method("shortgpt")
@dataclass(kw_only=True)
class ShortGPT(Compressor):
    """Drop the ``n_remove`` decoder layers with the lowest Block Influence."""

    n_remove: int = 1
    n_samples: int | None = None  # calibration windows used (default: all)
    needs_calibration = True
    supports_distributed = True

    def validate(self, model: nn.Module) -> None:
        n = len(get_adapter(model).blocks())
        if not 0 < self.n_remove < n:
            raise ConfigError(f"shortgpt: n_remove must be in 1..{n - 1} for {n} layers, got {self.n_remove}")

    def apply(self, model: nn.Module, calib: torch.Tensor | None = None) -> nn.Module:
        scores = block_influence(model, calib if self.n_samples is None else calib[: self.n_samples],
                                 key=self.to_dict())
        remove = sorted(sorted(range(len(scores)), key=lambda i: scores[i])[: self.n_remove])
        log.info("ShortGPT block influence %s; removing layers %s",
                 [round(s, 4) for s in scores], remove)
        self.report_ = LayerReport(kept=[i for i in range(len(scores)) if i not in remove], removed=remove,
                                   scores=scores)
        return remove_layers(model, remove)
