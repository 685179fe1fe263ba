"""Distillation losses: each divergence equals its formula, the limits hold, and the top-k path
agrees with the full distributions."""

import math

import pytest
import torch

from llmdeploy.distill import LOSSES, coarsen, distill_loss, divergence
from llmdeploy.errors import ConfigError

P = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
Q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p.tolist(), q.tolist()) if a > 0)


def test_each_divergence_equals_its_formula_on_hand_made_distributions():
    t, s = P.log(), Q.log()
    assert float(divergence("forward_kl", t, s)) == pytest.approx(kl(P, Q))
    assert float(divergence("reverse_kl", t, s)) == pytest.approx(kl(Q, P))
    for beta in (0.1, 0.5, 0.9):
        m = beta * P + (1 - beta) * Q
        assert float(divergence("jsd", t, s, beta=beta)) == pytest.approx(beta * kl(P, m) + (1 - beta) * kl(Q, m))
    for lam in (0.1, 0.5):
        assert float(divergence("skew_kl", t, s, skew=lam)) == pytest.approx(kl(P, lam * P + (1 - lam) * Q))
        assert float(divergence("skew_reverse_kl", t, s, skew=lam)) == pytest.approx(kl(Q, lam * Q + (1 - lam) * P))
    assert float(divergence("skew_kl", t, s, skew=0.0)) == pytest.approx(kl(P, Q))


def test_divergences_are_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 50, generator=g).log_softmax(-1), torch.randn(64, 50, generator=g).log_softmax(-1)
    for name in LOSSES:
        assert (divergence(name, a, b) >= -1e-6).all(), name
        assert divergence(name, a, a).abs().max() < 1e-6, name


def test_jsd_limits_are_forward_and_reverse_kl():
    t, s = P.log(), Q.log()
    eps = 1e-4  # JSD_beta / beta -> KL(T||S) as beta -> 0; JSD_beta / (1 - beta) -> KL(S||T) as beta -> 1
    assert float(divergence("jsd", t, s, beta=eps)) / eps == pytest.approx(kl(P, Q), rel=1e-3)
    assert float(divergence("jsd", t, s, beta=1 - eps)) / eps == pytest.approx(kl(Q, P), rel=1e-3)
    assert float(divergence("jsd", t, s, beta=0.0)) == pytest.approx(kl(P, Q))
    assert float(divergence("jsd", t, s, beta=1.0)) == pytest.approx(kl(Q, P))


def test_top_k_path_agrees_with_the_full_distributions():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 7, 40, generator=g), 3 * torch.randn(2, 7, 40, generator=g)
    for name in LOSSES:
        for temp in (1.0, 2.0):
            full = distill_loss(student, teacher, name, temperature=temp)
            tl = torch.log_softmax(teacher / temp, -1)
            v, i = torch.topk(tl, 40)
            assert float(distill_loss(student, (v, i), name, temperature=temp)) == pytest.approx(float(full), rel=1e-4)
            if name in ("forward_kl", "skew_kl"):  # teacher-weighted: a peaked teacher's top-20 suffices
                approx = distill_loss(student, (*torch.topk(tl, 20),), name, temperature=temp)
                assert float(approx) == pytest.approx(float(full), rel=0.1, abs=0.02), name
                assert float(approx) <= float(full) + 1e-6  # coarsening never raises the divergence
    t, s = coarsen(torch.log_softmax(student, -1), torch.topk(teacher, 5).indices,
                   torch.topk(torch.log_softmax(teacher, -1), 5).values)
    assert torch.allclose(t.exp().sum(-1), torch.ones(2, 7)) and torch.allclose(s.exp().sum(-1), torch.ones(2, 7))


def test_mask_and_temperature_and_errors():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(1, 4, 10, generator=g), torch.randn(1, 4, 10, generator=g)
    mask = torch.tensor([[False, False, True, True]])
    assert float(distill_loss(a, b, mask=mask)) == pytest.approx(float(distill_loss(a[:, 2:], b[:, 2:])))
    assert float(distill_loss(a, b, temperature=2.0)) == pytest.approx(
        4 * float(divergence("forward_kl", torch.log_softmax(b / 2, -1), torch.log_softmax(a / 2, -1)).mean()))
    for bad in ({"loss": "l2"}, {"temperature": 0.0}, {"loss": "jsd", "beta": 1.5}, {"loss": "skew_kl", "skew": 1.0}):
        with pytest.raises(ConfigError):
            distill_loss(a, b, **bad)
