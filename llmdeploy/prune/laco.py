"""LaCo, layer collapse (Yang et al., 2024): fold runs of later layers into an earlier one.

Reserving-Differences-while-Seeking-Common (RDSC): folding layers ``l+1 … l+C-1`` into ``l``
gives every merged parameter ``θ* = θ_l + Σ_{k=1}^{C-1} (θ_{l+k} − θ_l)``, each difference taken
against the *original* ``θ_l``. Note what the formula implies: with ``C = 2`` the fold is
``θ_l + (θ_{l+1} − θ_l) = θ_{l+1}``, i.e. layer ``l`` is dropped and ``l+1`` kept; merging starts
to differ from dropping at ``C >= 3`` (``θ_{l+1} + θ_{l+2} − θ_l``). The paper uses ``C = 4``.

The greedy search goes from the top of the network down: fold at ``l``; if the similarity
between the folded and the original model's last hidden states on a few calibration texts
stays above ``threshold``, keep the fold and move down by ``interval``, otherwise move down by
one; stop below ``lowest`` or once ``target_layers`` remain. A trial swaps a single merged
layer into the block list (no copy of the whole model).

Choices, against the paper and the official notebook (``laco_llama-13b.ipynb``):

* **The merge** follows the paper's formula. The notebook accumulates into the tensor it reads
  from (``copy[l] += θ_{l+k} − copy[l]``), which leaves ``θ_{l+C-1}``: plain layer dropping.
  Fixed here (a known bug).
* **What is merged** (``merge_norms``): the notebook merges the seven linear weights only and
  keeps layer ``l``'s norms; the paper speaks of "parameters". Default ``False`` (the notebook:
  the block's linears, weights and biases, from the adapter); ``True`` merges every floating
  tensor of the layer, norms included.
* **Similarity** (``similarity``): the notebook flattens each text's last hidden states
  (tokens × hidden) into one vector and averages the cosine over texts; the paper says "cosine
  similarity of the representations" without more. Default ``"sequence"`` (the notebook);
  ``"token"`` averages the per-token cosine over all tokens instead.
* **Where the first trial starts**: at ``l = H − C`` (``H`` = ``highest``, the last layer by
  default), folding ``l+1 … l+C−1`` into ``l``, as the paper's algorithm and the notebook
  (``lay = HIGHEST_LAY - MERGE_LAYERS``): the top layer itself is never folded.
* **Texts**: the notebook uses 5 short Wikipedia openings; here the first ``n_samples``
  calibration windows cut to ``sample_len`` tokens.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..compress.base import Compressor, register_method
from ..errors import ConfigError
from ..models.adapters import get_adapter
from .layers import LayerReport, per_layer_config_lists, replace_blocks

log = logging.getLogger(__name__)


def rdsc_merge(layers: list[nn.Module], modules: list[str] | None = None) -> nn.Module:
    """A copy of ``layers[0]`` with ``θ_0 + Σ_k (θ_k − θ_0)`` for every floating tensor of the
    sub-modules ``modules`` (paths relative to the layer; None: every floating tensor)."""
    merged = copy.deepcopy(layers[0])
    base = layers[0].state_dict()
    others = [layer.state_dict() for layer in layers[1:]]
    new_state = {}
    for key, theta in base.items():
        selected = modules is None or any(key.startswith(m + ".") for m in modules)
        if theta.dtype.is_floating_point and selected:
            acc = theta.clone()
            for sd in others:
                acc += sd[key] - theta
            new_state[key] = acc
        else:
            new_state[key] = theta
    merged.load_state_dict(new_state)
    return merged


@torch.no_grad()
def _last_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-1]


def representation_similarity(a: torch.Tensor, b: torch.Tensor, how: str) -> float:
    """Cosine similarity of two (batch, tokens, hidden) representations: per sequence over the
    flattened tokens × hidden matrix, averaged over sequences (``"sequence"``, the notebook's),
    or per token, averaged over every token (``"token"``)."""
    a, b = a.float(), b.float()
    if how == "sequence":
        return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1).mean().item()
    return F.cosine_similarity(a, b, dim=-1).mean().item()


@register_method("laco")
@dataclass(kw_only=True)
class LaCo(Compressor):
    """Layer collapse with RDSC merges and a representation-similarity guard.

    ``merge_layers`` (C) layers are folded per merge, ``interval`` (I) is the minimum distance
    between merges, ``threshold`` (T) the cosine similarity a fold must keep, ``lowest`` (L) and
    ``highest`` (H, default: the last layer) bound where merges happen, and the search stops once
    ``target_layers`` remain. The similarity (``similarity``: ``"sequence"`` or ``"token"``)
    is measured on the first ``n_samples`` calibration windows cut to ``sample_len`` tokens;
    ``merge_norms`` also merges the norms (see the module docstring for both choices).
    """

    merge_layers: int = 4
    interval: int = 2
    threshold: float = 0.65
    lowest: int = 1
    highest: int | None = None
    target_layers: int | None = None
    n_samples: int = 5
    sample_len: int = 256
    similarity: str = "sequence"
    merge_norms: bool = False
    needs_calibration = True

    def validate(self, model: nn.Module) -> None:
        n = len(get_adapter(model).blocks())
        if self.merge_layers < 1:
            raise ConfigError(f"laco: merge_layers must be >= 1, got {self.merge_layers}")
        if self.interval < 1:
            raise ConfigError(f"laco: interval must be >= 1, got {self.interval}")
        high = n - 1 if self.highest is None else self.highest
        if not 0 <= self.lowest <= high < n:
            raise ConfigError(f"laco: need 0 <= lowest ({self.lowest}) <= highest ({high}) < {n} layers")
        if self.similarity not in ("sequence", "token"):
            raise ConfigError(f"laco: similarity must be 'sequence' or 'token', got {self.similarity!r}")
        if self.target_layers is not None and not 0 < self.target_layers <= n:
            raise ConfigError(f"laco: target_layers must be in 1..{n}, got {self.target_layers}")

    def apply(self, model: nn.Module, calib: torch.Tensor | None = None) -> nn.Module:
        adapter = get_adapter(model)
        blocks = list(adapter.blocks())
        n_original = len(blocks)
        origins = list(range(n_original))
        per_layer = per_layer_config_lists(model)
        ids = calib[: self.n_samples, : self.sample_len].to(next(model.parameters()).device)
        reference = _last_hidden(model, ids)
        target = self.target_layers or 1
        c = self.merge_layers
        high = len(blocks) - 1 if self.highest is None else self.highest
        l = max(high - c, 0)  # noqa: E741 - the paper's name; first trial folds l+1..l+C-1 into l
        paths = None if self.merge_norms else list(adapter.block_linears(blocks[0]))
        report = self.report_ = LayerReport()
        while l >= self.lowest and len(blocks) > target and c > 1:
            span = min(c, len(blocks) - l, len(blocks) - target + 1)
            if span < 2:
                l -= 1  # noqa: E741
                continue
            merged = rdsc_merge(blocks[l : l + span], paths)
            trial = blocks[:l] + [merged] + blocks[l + span :]
            trial_origins = origins[:l] + [origins[l]] + origins[l + span :]
            replace_blocks(model, trial, trial_origins, per_layer)
            sim = representation_similarity(_last_hidden(model, ids), reference, self.similarity)
            accepted = sim > self.threshold
            log.info("LaCo: fold layers %s into %d: similarity %.4f -> %s",
                     origins[l + 1 : l + span], origins[l], sim, "accept" if accepted else "reject")
            fold = {"into": origins[l], "folded": origins[l + 1 : l + span], "similarity": sim}
            report.trials.append(dict(fold, accepted=accepted))
            if accepted:
                report.merges.append(fold)
                blocks, origins = trial, trial_origins
                l -= self.interval  # noqa: E741
            else:
                l -= 1  # noqa: E741
        replace_blocks(model, blocks, origins, per_layer)
        report.kept = list(origins)
        report.removed = [i for i in range(n_original) if i not in origins]
        log.info("LaCo: %s", report.summary())
        return model
