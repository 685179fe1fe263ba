"""Divergences between a teacher's and a student's next-token distributions.

Every divergence takes log-probabilities over the same categories (last dimension) and returns
one value per position; :func:`distill_loss` averages it over the positions that count and
scales by T² (Hinton et al.: the gradients of softened distributions shrink as 1/T²).

With T the teacher's and S the student's distribution:

* ``forward_kl``: KL(T ‖ S) — mass-covering, the classic KD loss;
* ``reverse_kl``: KL(S ‖ T) — mode-seeking (MiniLLM);
* ``jsd``: the generalized Jensen–Shannon divergence of GKD (Agarwal et al., 2024; TRL's
  ``beta``): β·KL(T ‖ M) + (1 − β)·KL(S ‖ M) with M = β·T + (1 − β)·S. It vanishes at β = 0
  and 1; there, as TRL does, it is defined by its normalised limits — β = 0 is forward KL
  (JSD_β / β → KL(T ‖ S)) and β = 1 reverse KL;
* ``skew_kl``: KL(T ‖ λ·T + (1 − λ)·S) and ``skew_reverse_kl``: KL(S ‖ λ·S + (1 − λ)·T), the
  skew divergences of DistiLLM (Ko et al., 2024; λ = ``skew``, their α = 0.1), bounded where
  the plain KL is not; λ = 0 gives the plain divergences.

A teacher given as top-k (``(log_probs, token_ids)``, see :class:`~llmdeploy.distill.teacher.TopKCache`)
is compared on the *coarsened* distributions: its k tokens plus one bucket for the rest of the
mass, for both models (:func:`coarsen`). That is an exact divergence between the coarsened
distributions — never above the full one for the KL family (data processing), equal to it when
k is the vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError

LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl")


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ Q) per position from log-probabilities (0·log 0 = 0)."""
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1)


def _mix(a_log: torch.Tensor, b_log: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·A + (1 − w)·B)."""
    return torch.logaddexp(a_log + math.log(w), b_log + math.log1p(-w))


def divergence(name: str, teacher_log: torch.Tensor, student_log: torch.Tensor, *, beta: float = 0.5,
               skew: float = 0.1) -> torch.Tensor:
    """The divergence ``name`` (one of :data:`LOSSES`) per position."""
    t, s = teacher_log, student_log
    if name == "forward_kl":
        return _kl(t, s)
    if name == "reverse_kl":
        return _kl(s, t)
    if name == "jsd":
        if not 0 <= beta <= 1:
            raise ConfigError(f"jsd: beta must be in [0, 1], got {beta}")
        if beta == 0:
            return _kl(t, s)
        if beta == 1:
            return _kl(s, t)
        m = _mix(t, s, beta)
        return beta * _kl(t, m) + (1 - beta) * _kl(s, m)
    if name in ("skew_kl", "skew_reverse_kl"):
        if not 0 <= skew < 1:
            raise ConfigError(f"{name}: skew must be in [0, 1), got {skew}")
        if name == "skew_kl":
            return _kl(t, _mix(t, s, skew)) if skew else _kl(t, s)
        return _kl(s, _mix(s, t, skew)) if skew else _kl(s, t)
    raise ConfigError(f"unknown distillation loss {name!r}; choose one of {', '.join(LOSSES)}")


def coarsen(student_log: torch.Tensor, top_ids: torch.Tensor, top_log: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) log-probabilities over the teacher's top-k tokens plus a last bucket for
    the rest of the mass, from the student's full log-probabilities."""
    s_top = student_log.gather(-1, top_ids.long())
    t_top = top_log.to(s_top.dtype)

    def rest(top: torch.Tensor) -> torch.Tensor:  # log(1 − Σ p_top), away from log 0
        return torch.log1p(-torch.logsumexp(top, dim=-1).exp().clamp(max=1 - 1e-7)).unsqueeze(-1)

    return torch.cat([t_top, rest(t_top)], -1), torch.cat([s_top, rest(s_top)], -1)


def distill_loss(student_logits: torch.Tensor, teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                 loss: str = "forward_kl", *, temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions (those where ``mask`` is true) of the divergence between the teacher —
    logits, or top-k ``(log-probabilities, token ids)`` already at ``temperature`` — and the
    student's logits, both softened by ``temperature``, times T²."""
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher, tuple):
        t, s = coarsen(s, teacher[1], teacher[0])
    else:
        t = F.log_softmax(teacher.float() / temperature, dim=-1)
    d = divergence(loss, t, s, beta=beta, skew=skew)
    if mask is not None:
        m = mask.to(d.dtype)
        d = (d * m).sum() / m.sum().clamp(min=1)
    else:
        d = d.mean()
    return d * temperature**2


def kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student) of the next-token distributions."""
    return distill_loss(student_logits, teacher_logits, "forward_kl")


def kl_topk(student_logits: torch.Tensor, top_logp: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student) over the teacher's top-k tokens plus one bucket."""
    return distill_loss(student_logits, (top_logp, top_ids), "forward_kl")
