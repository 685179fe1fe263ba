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

    Random crops, as in the GPTQ protocol: for each sample a character offset is drawn with a
    generator seeded by ``seed``; the text from there is tokenized and the first ``seq_len``
    tokens after the first (possibly cut) token form the window. Only the crops are tokenized,
    so this stays fast on large corpora; the same seed gives the same windows.
    """
    if n_samples <= 0 or seq_len <= 0:
        raise CalibrationDataError(f"n_samples and seq_len must be positive, got {n_samples}, {seq_len}")
    text = load_text(corpus, "train")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, max(len(text), 1), (n_samples,), generator=gen).tolist()
    windows = []
    for start in starts:
        span = seq_len * 6
        while True:
            begin = max(0, min(start, len(text) - span))
            ids = tokenize_text(tokenizer, text[begin : begin + span])[1:]
            if ids.numel() >= seq_len:
                windows.append(ids[:seq_len])
                break
            if span >= len(text):
                raise CalibrationDataError(
                    f"the train split of {corpus!r} has {ids.numel()} tokens, fewer than seq_len={seq_len}"
                )
            span *= 2
    return torch.stack(windows)
