"""Split-KV attention and the exact merge of partial results (the online-softmax rule).

Attention over a subset of the keys returns its normalised partial output together with the
running max logit and the log-sum-exp of the logits it saw; partials over disjoint key sets merge
into exactly the attention over their union:

    lse = logsumexp_i(lse_i),   out = sum_i exp(lse_i - lse) * out_i.

DistAttention (DistKV-LLM) computes each partial where its KV blocks live and moves only queries
and partials; FlashDecoding uses the same identity across thread blocks.
"""

from __future__ import annotations

import torch


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                      q_pos: torch.Tensor | None = None, k_pos: torch.Tensor | None = None,
                      k_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of ``q`` (B, H, Tq, D) over ``k``/``v`` (B, Hkv, Tk, D) with grouped heads.

    Causality is by position: query ``i`` sees key ``j`` when ``k_pos[b, j] <= q_pos[b, i]``
    (positions (B, Tq) and (B, Tk); omit both for no causal mask); ``k_valid`` (B, Tk) masks
    padding. Returns ``(out, max, lse)``: ``out`` (B, H, Tq, D) normalised over the keys seen,
    ``max`` and ``lse`` (B, H, Tq) in float32; a query that sees no key gets ``out = 0`` and
    ``max = lse = -inf``, which the merge weighs by zero.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    visible = None
    if q_pos is not None:
        visible = k_pos[:, None, None, :] <= q_pos[:, None, :, None]
    if k_valid is not None:
        valid = k_valid[:, None, None, :]
        visible = valid if visible is None else visible & valid
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(dim=-1)
    safe_m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - safe_m[..., None])
    denom = p.sum(dim=-1)
    out = torch.matmul(p, v.float()) / denom.clamp_min(1e-30)[..., None]
    lse = safe_m + torch.log(denom)
    lse = torch.where(denom > 0, lse, torch.full_like(lse, float("-inf")))
    return out.to(q.dtype), m, lse


def merge_partials(partials: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge ``(out, max, lse)`` partials over disjoint key sets into one; exact up to rounding."""
    if len(partials) == 1:
        return partials[0]
    outs = torch.stack([p[0].float() for p in partials])
    maxes = torch.stack([p[1] for p in partials]).amax(dim=0)
    lses = torch.stack([p[2] for p in partials])
    lse = torch.logsumexp(lses, dim=0)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w = torch.exp(lses - safe)  # zero for partials that saw nothing
    out = (w[..., None] * outs).sum(dim=0)
    return out.to(partials[0][0].dtype), maxes, lse
