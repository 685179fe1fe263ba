"""Pruning methods: weight pruning (magnitude, Wanda, SparseGPT, SparseLLM; unstructured or N:M,
stored compactly), layer removal (LaCo, ShortGPT, naive dropping) and width slicing (SliceGPT)."""

from .laco import LaCo, rdsc_merge
from .layers import DropLayers, remove_layers, replace_blocks
from .magnitude import Magnitude
from .masks import SparsityPattern, parse_pattern, select_mask
from .pruner import WeightPruner, realised_sparsity
from .shortgpt import ShortGPT, block_influence
from .slicegpt import SliceGPT, sliced_width
from .sparse_linear import SparseLinear
from .sparsegpt import SparseGPT, sparsegpt_prune
from .sparsellm import SparseLLM
from .wanda import Wanda

__all__ = [
    "DropLayers",
    "LaCo",
    "Magnitude",
    "ShortGPT",
    "SliceGPT",
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
    "sliced_width",
    "sparsegpt_prune",
]
