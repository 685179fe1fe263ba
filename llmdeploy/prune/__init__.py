"""Pruning methods: layer removal (LaCo, ShortGPT, naive dropping)."""

from .laco import LaCo, rdsc_merge
from .layers import DropLayers, remove_layers, replace_blocks
from .shortgpt import ShortGPT, block_influence

__all__ = ["DropLayers", "LaCo", "ShortGPT", "block_influence", "rdsc_merge", "remove_layers", "replace_blocks"]
