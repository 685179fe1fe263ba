"""The evaluation harness shared by every method: perplexity, zero-shot tasks (lm-eval),
footprint, speed, and ``evaluate`` that gathers them into one result."""

from .footprint import Footprint, footprint
from .perplexity import PerplexityResult, perplexity, test_windows
from .results import EvalResult, evaluate
from .speed import SpeedResult, speed
from .zero_shot import OFFLINE_TASKS, PAPER_TASKS, zero_shot

__all__ = [
    "OFFLINE_TASKS",
    "PAPER_TASKS",
    "EvalResult",
    "Footprint",
    "PerplexityResult",
    "SpeedResult",
    "evaluate",
    "footprint",
    "perplexity",
    "speed",
    "test_windows",
    "zero_shot",
]
