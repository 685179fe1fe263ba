"""Pruning methods: weight pruning (magnitude, Wanda, SparseGPT, SparseLLM; unstructured or N:M,
stored compactly) and layer removal (LaCo, ShortGPT, naive dropping)."""

from .laco import LaCo, rdsc_merge
from .layers import DropLayers, remove_layers, replace_blocks
from .magnitude import Magnitude
from .masks import SparsityPattern, parse_pattern, select_mask
from .pruner import WeightPruner, realised_sparsity
from .shortgpt import ShortGPT, block_influence
from .sparse_linear import SparseLinear
from .sparsegpt import SparseGPT, sparsegpt_prune
from .sparsellm import SparseLLM
from .wanda import Wanda

__all__ = [
    "DropLayers",
    "LaCo",
    "Magnitude",
    "ShortGPT",
    "SparseGPT",
    "SparseLLM",
    "SparseLinear",
    "SparsityPattern",
    "Wanda",
    "WeightPruner",
    "block_influence",
    "parse_pattern",
    "rdsc_merge",
    "realised_sparsity",
    "remove_layers",
    "replace_blocks",
    "select_mask",
    "sparsegpt_prune",
]
