"""Perplexity with the GPTQ/AQLM protocol.

The test split is joined and tokenized once; it is cut into non-overlapping windows of
``seq_len`` tokens (the remainder is dropped; c4 keeps the first 256 windows, as GPTQ does); each
window is scored independently, and ``ppl = exp(mean NLL)`` over every shifted target
(``seq_len - 1`` per window). The protocol's ``seq_len`` is 2048, the default of
:func:`perplexity`, :func:`llmdeploy.eval.evaluate` and ``llmdeploy eval``; the default corpus is
``shakespeare``, because it works offline (``wikitext2`` and ``c4`` need the hub).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.calibration import tokenize_text
from ..data.corpora import MAX_TEST_WINDOWS, load_text
from ..errors import EvaluationError
from ..kv import KVQuantConfig, PagedKVCache
from ..kv.engine import cache_kwarg
from ..models.adapters import context_length


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per target token (nats)
    n_tokens: int  # scored target tokens
    n_windows: int
    seq_len: int
    corpus: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def test_windows(tokenizer, corpus: str | os.PathLike, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """The evaluation windows (n_windows, seq_len) of a corpus's test split.

    With ``max_windows``, only a prefix of the text is tokenized when it yields enough tokens
    plus a margin: tokenizers split at word boundaries, so the first windows are the same as
    those of the whole text, at a fraction of the cost.
    """
    text = load_text(corpus, "test")
    ids = None
    if max_windows is not None:
        margin = 64
        prefix = tokenize_text(tokenizer, text[: (max_windows * seq_len + margin) * 8])
        if prefix.numel() >= max_windows * seq_len + margin:
            ids = prefix[: max_windows * seq_len]
    if ids is None:
        ids = tokenize_text(tokenizer, text)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    n = min(n, MAX_TEST_WINDOWS.get(str(corpus), n))
    if n == 0:
        raise EvaluationError(f"the test split of {corpus!r} has {ids.numel()} tokens, fewer than seq_len={seq_len}: "
                              "use a shorter seq_len or a longer corpus")
    return ids[: n * seq_len].reshape(n, seq_len)


def check_context(model, seq_len: int) -> None:
    """Raise :class:`EvaluationError` when ``seq_len`` is longer than the model's context."""
    if seq_len < 2:
        raise EvaluationError(f"seq_len must be >= 2, got {seq_len}")
    context = context_length(model)
    if context is not None and seq_len > context:
        raise EvaluationError(f"seq_len={seq_len} is longer than the model's context ({context} positions); "
                              f"use seq_len <= {context}")


@torch.no_grad()
def perplexity_of_windows(model, windows: torch.Tensor, batch_size: int = 4, desc: str = "perplexity",
                          kv_quant: KVQuantConfig | None = None, kv_block_size: int = 16):
    """Sum of NLL and count of target tokens over ``windows`` (each scored on its own).

    With ``kv_quant``, every window runs through a fresh quantized :class:`PagedKVCache`, so each
    token attends to the quantized keys and values of every position (itself included): the
    quality a decode sees when its whole context was cached quantized (KIVI's and KVQuant's way of
    measuring)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, leave=False):
        ids = windows[start : start + batch_size].to(device)
        if kv_quant is None:
            logits = model(input_ids=ids, use_cache=False).logits
        else:
            blocks = ids.shape[0] * -(-ids.shape[1] // kv_block_size)
            cache = PagedKVCache(blocks, kv_block_size, quant=kv_quant)
            logits = model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache}).logits
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += ids[:, 1:].numel()
    return total, count


def perplexity(
    model,
    tokenizer,
    corpus: str | os.PathLike = "shakespeare",
    seq_len: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 4,
    kv_quant: KVQuantConfig | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on the test split of ``corpus`` (GPTQ/AQLM protocol); with
    ``kv_quant``, attention reads a KV cache quantized that way (see :func:`perplexity_of_windows`)."""
    t0 = time.perf_counter()
    check_context(model, seq_len)
    windows = test_windows(tokenizer, corpus, seq_len, max_windows)
    was_training = model.training
    model.eval()
    total, count = perplexity_of_windows(model, windows, batch_size=batch_size, kv_quant=kv_quant)
    model.train(was_training)
    nll = total / count
    return PerplexityResult(
        ppl=math.exp(nll), nll=nll, n_tokens=count, n_windows=windows.shape[0], seq_len=seq_len,
        corpus=str(corpus), seconds=time.perf_counter() - t0,
    )
