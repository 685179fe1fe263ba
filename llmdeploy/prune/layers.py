"""Removing whole decoder layers and keeping the model consistent afterwards.

The result is an ordinary, smaller model of the same architecture: the block list, the
config's layer count, every per-layer config list (e.g. ``layer_types``) and the ``layer_idx``
that attention modules use to address the KV cache all agree, so it generates with the cache
and saves as a plain Hugging Face checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..compress.base import Compressor, Report, register_method
from ..errors import ConfigError
from ..models.adapters import get_adapter

_NOT_PER_LAYER = {"architectures"}


@dataclass
class LayerReport(Report):
    """Which original layers were kept and removed; LaCo's accepted folds with their similarity
    and every trial; ShortGPT's Block Influence scores."""

    kept: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    merges: list[dict] = field(default_factory=list)
    trials: list[dict] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{len(self.kept)} layers kept; removed original layers {self.removed}"
        if self.merges:
            s += f"; accepted fold similarities {[round(m['similarity'], 3) for m in self.merges]}"
        return s


def per_layer_config_lists(model: nn.Module) -> dict[str, list]:
    """Config attributes that are lists with one entry per decoder layer (e.g. ``layer_types``)."""
    config = model.config
    n = config.num_hidden_layers
    return {k: list(v) for k, v in vars(config).items()
            if isinstance(v, (list, tuple)) and len(v) == n and k not in _NOT_PER_LAYER}


def replace_blocks(model: nn.Module, blocks: list[nn.Module], origins: list[int],
                   per_layer: dict[str, list]) -> None:
    """Make ``blocks`` the model's decoder layers; ``origins[i]`` is the original index whose
    per-layer config entries block ``i`` takes (``per_layer`` holds the original lists)."""
    adapter = get_adapter(model)
    parent, attr = adapter.blocks_path.rsplit(".", 1)
    setattr(model.get_submodule(parent), attr, nn.ModuleList(blocks))
    for i, block in enumerate(blocks):
        for mod in block.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = i
    model.config.num_hidden_layers = len(blocks)
    for key, values in per_layer.items():
        setattr(model.config, key, [values[o] for o in origins])


def remove_layers(model: nn.Module, remove: list[int]) -> nn.Module:
    """Drop the decoder layers with these (current) indices."""
    blocks = list(get_adapter(model).blocks())
    bad = [i for i in remove if not 0 <= i < len(blocks)]
    if bad or len(set(remove)) != len(remove):
        raise ConfigError(f"layer indices {remove} are out of range or repeated for {len(blocks)} layers")
    if len(remove) >= len(blocks):
        raise ConfigError(f"cannot remove {len(remove)} of {len(blocks)} layers: at least one must stay")
    keep = [i for i in range(len(blocks)) if i not in set(remove)]
    replace_blocks(model, [blocks[i] for i in keep], keep, per_layer_config_lists(model))
    return model


@register_method("drop_layers")
@dataclass(kw_only=True)
class DropLayers(Compressor):
    """Remove the listed decoder layers outright (the naive baseline of layer pruning)."""

    layers: list[int] = field(default_factory=list)

    def validate(self, model: nn.Module) -> None:
        n = len(get_adapter(model).blocks())
        if any(not 0 <= i < n for i in self.layers) or len(set(self.layers)) != len(self.layers) \
                or len(self.layers) >= n:
            raise ConfigError(f"drop_layers: invalid layers {self.layers} for a model with {n} layers")
        if not self.layers:
            raise ConfigError("drop_layers would change nothing: the list of layers to drop is empty")

    def apply(self, model: nn.Module, calib: torch.Tensor | None = None) -> nn.Module:
        n = len(get_adapter(model).blocks())
        self.report_ = LayerReport(kept=[i for i in range(n) if i not in self.layers], removed=sorted(self.layers))
        return remove_layers(model, list(self.layers))
