"""Faster decoding: drafters propose token trees, one engine verifies them in one forward.

``generate(model, tokenizer, prompts, max_new_tokens, drafter=...)`` with a
:class:`MedusaHeads`, :class:`ReDrafter`, :class:`HiddenTransfer` or :class:`DraftModel`;
greedy output equals plain greedy decoding, sampling is exact (rejection) or Medusa's typical
acceptance. :mod:`.train` makes self-distillation data and trains the drafters.
"""

from .base import Drafter, DraftVocabMixin, frequent_tokens, load_drafter
from .cache import TreeCache
from .draft_model import DraftModel
from .engine import (
    DecodeStats,
    GenerationResult,
    accept_greedy,
    accept_rejection,
    accept_typical,
    generate,
)
from .hidden_transfer import HiddenTransfer
from .medusa import MedusaHeads
from .paged import SpeculativeEngine
from .redrafter import ReDrafter
from .train import SelfDistillData, measure_accuracy, self_distill_data, train_drafter
from .tree import TokenTree, best_tree, static_tree, tree_from_choices, tree_inputs

__all__ = [
    "DecodeStats", "DraftModel", "DraftVocabMixin", "Drafter", "GenerationResult", "HiddenTransfer", "MedusaHeads", "ReDrafter",
    "SelfDistillData", "SpeculativeEngine", "TokenTree", "TreeCache", "accept_greedy", "accept_rejection", "accept_typical",
    "best_tree", "frequent_tokens", "generate", "load_drafter", "measure_accuracy", "self_distill_data", "static_tree",
    "train_drafter", "tree_from_choices", "tree_inputs",
]
