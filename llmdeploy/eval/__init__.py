"""The evaluation harness shared by every method: perplexity and footprint."""

from .footprint import Footprint, footprint
from .perplexity import PerplexityResult, perplexity, test_windows

__all__ = ["Footprint", "PerplexityResult", "footprint", "perplexity", "test_windows"]
