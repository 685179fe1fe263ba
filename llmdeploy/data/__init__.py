"""Corpora with fixed train/test splits and calibration windows."""

from .calibration import calibration, tokenize_text
from .corpora import corpus_names, load_text, shakespeare_split, work_key

__all__ = ["calibration", "corpus_names", "load_text", "shakespeare_split", "tokenize_text", "work_key"]
