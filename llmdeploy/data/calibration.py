"""Calibration windows: random token windows from a corpus's train split, deterministic per seed."""

from __future__ import annotations

import os

import torch

from ..errors import CalibrationDataError
from .corpora import load_text


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a whole text (1-D), tokenized once without special tokens."""
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False)
    return enc["input_ids"][0]


def calibration(
    tokenizer,
    corpus: str | os.PathLike = "shakespeare",
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens from the train split, shape (n_samples, seq_len).

    The train text is tokenized once; window starts are drawn uniformly with a generator
    seeded by ``seed`` (the GPTQ protocol's random crops), so the same seed gives the same windows.
    """
    if n_samples <= 0 or seq_len <= 0:
        raise CalibrationDataError(f"n_samples and seq_len must be positive, got {n_samples}, {seq_len}")
    ids = tokenize_text(tokenizer, load_text(corpus, "train"))
    if ids.numel() <= seq_len:
        raise CalibrationDataError(
            f"the train split of {corpus!r} has {ids.numel()} tokens, fewer than seq_len={seq_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
