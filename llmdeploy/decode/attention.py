"""Attention for tree forwards on grouped-query models without copying the cache per query head.

transformers' SDPA attention expands the keys and values of a grouped-query (GQA) model to one
copy per query head (``repeat_kv``) whenever a forward has more than one query and a mask (its
GQA flag of SDPA is used only without a mask), so every verification of a token tree copies the
whole KV cache ``n_rep`` times in every layer (SmolLM2-135M: 3 copies of 3 heads, 30 layers).
Measured on CPU only (``python -m benchmarks.gqa_fold``: a 5-node tree forward of SmolLM2-135M,
results/decode/GQA_FOLD.md); on a GPU it is untimed. One query already avoids it (transformers folds the query heads of a group into rows).
:func:`folded_gqa` does the same for any number of queries: the ``n_rep`` query heads that share a
key/value head become ``n_rep * T`` rows of one head, the mask is repeated for them, and one SDPA
call per key/value head gives exactly the same numbers as attention over repeated keys (each row
is the same dot products and softmax), without the copies.

The folding is installed as an attention implementation of transformers' ``AttentionInterface``
for models whose implementation is ``"sdpa"`` (others are left as they are), only while
:func:`folded_gqa` is active; every case it does not cover (one query, no mask, per-head masks,
position biases, soft-capping) goes to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "llmdeploy_folded_gqa"


def folded_gqa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (B, heads, T, D) query, (B, kv_heads, L, D) key
    and value, a (B, 1, T, L) mask; returns (B, T, heads, D)."""
    n_rep = getattr(module, "num_key_value_groups", 1)
    B, H, T, D = query.shape
    if (n_rep > 1 and T > 1 and attention_mask is not None and attention_mask.dim() == 4
            and attention_mask.shape[1] == 1 and kwargs.get("position_bias") is None
            and kwargs.get("softcap") is None and not kwargs.get("output_attentions", False)):
        q = query.reshape(B, H // n_rep, n_rep * T, D)  # head h = g * n_rep + r -> rows r * T + t of head g
        mask = _repeated(attention_mask, n_rep)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
        return out.reshape(B, H, T, value.shape[-1]).transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


#: the last mask folded and its repetition: every layer of one forward gets the same mask tensor,
#: so it is repeated once per forward instead of once per layer (one tuple, replaced whole, so a
#: reader never sees half of an update; cleared when :func:`folded_gqa` exits)
_last: tuple = (None, 0, 0, None)  # mask, its _version, n_rep, repeated


def _repeated(mask: torch.Tensor, n_rep: int) -> torch.Tensor:
    global _last
    last, version, reps, out = _last
    if last is mask and version == mask._version and reps == n_rep:
        return out
    out = mask.repeat(1, 1, n_rep, 1)
    _last = (mask, mask._version, n_rep, out)
    return out


def register() -> None:
    """Register :func:`folded_gqa_attention` with transformers (idempotent)."""
    from transformers import AttentionInterface
    AttentionInterface.register(ATTN_IMPLEMENTATION, folded_gqa_attention)


@contextlib.contextmanager
def folded_gqa(*models: torch.nn.Module) -> Iterator[None]:
    """Inside the block, the models among ``models`` that attend with transformers' ``"sdpa"``
    attend with :func:`folded_gqa_attention`; restored on exit."""
    switched = []
    try:
        for m in models:
            config = getattr(m, "config", None)
            if getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(m, "set_attn_implementation"):
                register()
                m.set_attn_implementation(ATTN_IMPLEMENTATION)
                switched.append(m)
        yield
    finally:
        global _last
        _last = (None, 0, 0, None)
        for m in switched:
            m.set_attn_implementation("sdpa")
