"""Distillation losses: each divergence equals its formula, the limits hold, and the top-k path
agrees with the full distributions."""

import math

import pytest
import torch
import torch.nn.functional as F

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


# -- the Distill stage -------------------------------------------------------------------------
import copy  # noqa: E402

import llmdeploy  # noqa: E402
from llmdeploy.compress import Compose  # noqa: E402
from llmdeploy.distill import (  # noqa: E402
    Distill,
    HiddenMatch,
    combine_teachers,
    confidence_weights,
    kl_full,
    student_entropy,
)
from llmdeploy.errors import CheckpointError  # noqa: E402
from llmdeploy.finetune.lora import LoRALinear, merge_adapters  # noqa: E402
from llmdeploy.prune import DropLayers, SliceGPT  # noqa: E402

from .conftest import ids_for, interrupt_at  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    dense, tok = llmdeploy.load("tiny-llama")
    return dense.eval(), ids_for(tok, n=8, seq=32)


def kl_to(model, teacher, ids):
    with torch.no_grad():
        return float(kl_full(model(input_ids=ids).logits, teacher(input_ids=ids).logits))


@pytest.mark.parametrize("train", ["all", "lora"])
def test_distillation_after_layer_removal_closes_the_gap_to_the_teacher(tiny, train):
    dense, calib = tiny
    dropped = DropLayers(layers=[1])(copy.deepcopy(dense))
    before = kl_to(dropped, dense, calib)
    d = Distill(steps=12, batch_size=4, lr=3e-3 if train == "all" else 1e-2, train=train, warmup=0.0)
    student = Compose([DropLayers(layers=[1]), d])(copy.deepcopy(dense), calib)
    assert kl_to(student, dense, calib) < 0.8 * before
    assert d._start is None  # the kept teacher is released
    if train == "lora":  # merged back: plain linears again, same shapes
        assert all(type(m) is torch.nn.Linear for n, m in student.named_modules() if n.endswith("q_proj"))


def test_lora_merge_is_exact(tiny):
    dense, calib = tiny
    model = copy.deepcopy(dense)
    name = "model.layers.0.mlp.down_proj"
    w = LoRALinear.wrap(model.get_submodule(name), 4, 8.0, 0.0)
    torch.nn.init.normal_(w.lora_B)
    model.set_submodule(name, w)
    with torch.no_grad():
        with_adapter = model(input_ids=calib).logits
        assert merge_adapters(model, {name: w}) == (1, 0)
        assert type(model.get_submodule(name)) is torch.nn.Linear
        torch.testing.assert_close(model(input_ids=calib).logits, with_adapter, rtol=1e-5, atol=1e-5)


def test_on_policy_windows_are_the_students_own_continuations(tiny):
    dense, calib = tiny
    student = DropLayers(layers=[1])(copy.deepcopy(dense))
    d = Distill(on_policy=0.5, prompt_len=8, sample_temperature=0.0, batch_size=4, teacher_model=dense)
    order = torch.arange(8)
    ids, mask = d._batch(student, calib, order, 0, torch.device("cpu"))
    greedy = student.generate(calib[:2, :8], attention_mask=torch.ones(2, 8, dtype=torch.long), max_new_tokens=24,
                              min_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(ids[:2], greedy) and not torch.equal(ids[:2], calib[:2])
    assert torch.equal(ids[2:], calib[2:4])  # the rest stay corpus windows
    assert not mask[:2, :7].any() and mask[:2, 7:].all() and mask[2:].all()  # loss on generated tokens only
    sampled = Distill(on_policy=1.0, prompt_len=8, sample_temperature=1.0, batch_size=2, teacher_model=dense)
    a, _ = sampled._batch(student, calib, order, 3, torch.device("cpu"))
    b, _ = sampled._batch(student, calib, order, 3, torch.device("cpu"))
    assert torch.equal(a, b)  # seeded per step: a resumed run samples the same windows


def test_multi_teacher_combination_and_uncertainty_weights(tiny):
    g = torch.Generator().manual_seed(0)
    t1, t2 = torch.randn(3, 5, 11, generator=g).log_softmax(-1), torch.randn(3, 5, 11, generator=g).log_softmax(-1)
    w = torch.tensor([0.25, 0.75])
    for how in ("mean_prob", "mean_logprob"):
        c = combine_teachers([t1, t2], w, how)
        torch.testing.assert_close(c.exp().sum(-1), torch.ones(3, 5))  # a distribution per token
        torch.testing.assert_close(combine_teachers([t1, t1], w, how), t1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(combine_teachers([t1, t2], w, "mean_prob").exp(), 0.25 * t1.exp() + 0.75 * t2.exp())
    u = student_entropy(torch.randn(3, 5, 11, generator=g))
    assert ((u >= 0) & (u <= 1)).all()
    per_window = combine_teachers([t1, t2], torch.stack([1 - u, u]), "mean_prob")
    torch.testing.assert_close(per_window.exp(), (1 - u)[:, None, None] * t1.exp() + u[:, None, None] * t2.exp())
    dense, calib = tiny
    other = copy.deepcopy(dense)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    for combine in ("mean_prob", "mean_logprob", "uncertainty", "confidence"):
        d = Distill(steps=2, batch_size=4, teacher_model=[dense, other], teacher_combine=combine,
                    teacher_weights=[1.0, 3.0] if combine in ("mean_prob", "mean_logprob") else None,
                    select_fraction=0.5)
        d(DropLayers(layers=[1])(copy.deepcopy(dense)), calib)
        assert len(d.report_.history) == 2 and d.report_.teachers == 2


def test_confidence_weights_follow_ca_mkd_and_pick_the_domain_expert():
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(0, 11, (4, 6), generator=g)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 3:] = False
    lps = [torch.randn(4, 6, 11, generator=g).log_softmax(-1) for _ in range(3)]
    w = confidence_weights(lps, targets, mask)
    ce = torch.stack([torch.stack([-lp[b, :n].gather(-1, targets[b, :n, None]).mean() for b, n in enumerate([3, 6, 6, 6])])
                      for lp in lps])  # by hand, row by row
    torch.testing.assert_close(w, (1 - ce.exp() / ce.exp().sum(0)) / 2)
    torch.testing.assert_close(w.sum(0), torch.ones(4))
    # two "experts": each puts its mass on the targets of its own windows (0, 1 | 2, 3)
    onehot = F.one_hot(targets, 11).float()
    good, bad = (onehot * 8).log_softmax(-1), torch.zeros(4, 6, 11).log_softmax(-1)
    expert_a = torch.cat([good[:2], bad[2:]])
    expert_b = torch.cat([bad[:2], good[2:]])
    w = confidence_weights([expert_a, expert_b], targets, mask)
    assert (w[0, :2] > 0.9).all() and (w[1, 2:] > 0.9).all()  # 1 / (1 + e^(CE_good - log 11))


def test_top_k_cache_matches_the_teacher_on_the_fly(tiny, tmp_path):
    dense, calib = tiny
    runs, losses = [], []
    for top_k in (None, dense.config.vocab_size):
        d = Distill(steps=3, batch_size=4, lr=1e-3, teacher_model=dense, teacher_top_k=top_k,
                    teacher_cache=str(tmp_path / "cache") if top_k else None)
        runs.append(d(DropLayers(layers=[1])(copy.deepcopy(dense)), calib))
        losses.append(d.report_.history)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # Adam normalises each gradient, so float-rounding differences of the two paths reach ~1e-5
    for (k, a), b in zip(runs[0].state_dict().items(), runs[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-4, msg=k)


@pytest.mark.parametrize("extra", [{}, {"hidden_weight": 0.5}], ids=["logits", "with-hidden-matching"])
def test_distill_resume_equals_uninterrupted_run(tiny, tmp_path, extra):
    dense, calib = tiny
    cfg = dict(steps=6, batch_size=2, lr=1e-3, teacher_model=dense, on_policy=0.5, prompt_len=8, **extra)
    ref = Distill(**cfg)(DropLayers(layers=[1])(copy.deepcopy(dense)), calib)
    model = DropLayers(layers=[1])(copy.deepcopy(dense))
    handle = interrupt_at(model, 9, training_only=True)  # two training forwards a step: in step 5
    with pytest.raises(KeyboardInterrupt):
        Distill(**cfg, checkpoint_dir=str(tmp_path), save_every=2)(model, calib)
    handle.remove()
    d = Distill(**cfg, checkpoint_dir=str(tmp_path), save_every=2, resume=True)
    fresh = d(DropLayers(layers=[1])(copy.deepcopy(dense)), calib)
    assert d.report_.resumed_at == 4 and len(d.report_.history) == 6
    for (k, a), b in zip(ref.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    with pytest.raises(CheckpointError, match="different distillation run"):
        Distill(**{**cfg, "lr": 5e-4}, checkpoint_dir=str(tmp_path), resume=True)(
            DropLayers(layers=[1])(copy.deepcopy(dense)), calib)


def test_hidden_matching_projections_fit_and_train_across_widths(tiny):
    dense, calib = tiny
    same = HiddenMatch.fit(copy.deepcopy(dense), dense, calib[:4])
    assert same.pairs == [(i, i) for i in range(1, 4)]  # every block of the 3-layer model, same depth
    for proj in same.proj:  # the student is the teacher: the least-squares fit is the identity
        torch.testing.assert_close(proj.weight, torch.eye(64), rtol=0, atol=2e-3)
    with torch.no_grad():
        hs = dense(input_ids=calib, output_hidden_states=True).hidden_states
        assert float(same.loss(hs, hs, torch.ones(8, 31, dtype=torch.bool))) < 1e-5
    sliced = SliceGPT(sparsity=0.25)(copy.deepcopy(dense), calib)
    match = HiddenMatch.fit(sliced, dense, calib[:4], pairs=[[0, 0], [1, 1], [3, 3]])
    # a 48-wide residual stream inside; the last block hands the head a full-width state again
    assert [tuple(p.weight.shape) for p in match.proj] == [(64, 48), (64, 48), (64, 64)]
    mask = torch.ones(4, 31, dtype=torch.bool)
    with torch.no_grad():
        hs = sliced(input_ids=calib[:4], output_hidden_states=True).hidden_states
        ht = dense(input_ids=calib[:4], output_hidden_states=True).hidden_states
        fitted = float(match.loss(hs, ht, mask))
        for p in match.proj:  # least squares: any other projection does worse on the fitted windows
            p.weight.add_(1e-2 * torch.randn(p.weight.shape, generator=torch.Generator().manual_seed(0)))
        assert float(match.loss(hs, ht, mask)) > fitted
    assert fitted < 0.5  # SliceGPT rotates and slices the stream: a linear map recovers most of it
    # as a stage: hidden loss + cross-entropy on a sliced student, then the projections are dropped
    d = Distill(steps=8, batch_size=4, lr=3e-3, warmup=0.0, ce_weight=1.0, hidden_weight=1.0, teacher_model=dense)
    student = d(copy.deepcopy(sliced), calib)
    assert d.report_.loss == "cross-entropy + hidden" and d.report_.teachers == 1
    assert d.report_.history[-1] < d.report_.history[0]
    assert not any("hidden_match" in n for n, _ in student.named_parameters())
    for bad in ({"hidden_layers": [[4, 1]]}, {"hidden_layers": [[1]]}):
        with pytest.raises(ConfigError, match="hidden_layers"):
            Distill(steps=1, batch_size=2, hidden_weight=1.0, teacher_model=dense, **bad)(copy.deepcopy(sliced), calib)


@pytest.mark.parametrize("path", ["teacher_model", "recipe-start-top-k"])
def test_teacher_correction_is_cross_entropy_fine_tuning_of_the_teacher_first(tiny, path):
    """Minitron's teacher correction: distilling with ``teacher_correction_steps=n`` equals distilling
    from a copy of the teacher fine-tuned first by ``Distill(ce_weight=1, steps=n)`` with the stage's
    settings; the teacher passed in is left unchanged, and the correction moves the teacher."""
    dense, calib = tiny
    cfg = dict(steps=4, batch_size=4, lr=3e-3, warmup=0.0, train="lora", lora_rank=4, lora_alpha=8.0)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    fixed = Distill(**{**cfg, "steps": 3, "ce_weight": 1.0})(copy.deepcopy(dense), calib)
    assert any(not torch.equal(a, fixed.state_dict()[k]) for k, a in before.items())
    ref = Distill(**cfg, teacher_model=fixed)(DropLayers(layers=[1])(copy.deepcopy(dense)), calib)
    if path == "teacher_model":
        d = Distill(**cfg, teacher_model=dense, teacher_correction_steps=3)
        got = d(DropLayers(layers=[1])(copy.deepcopy(dense)), calib)
    else:  # the recipe's starting model, corrected before its top-k cache is made
        d = Distill(**cfg, teacher_correction_steps=3, teacher_top_k=dense.config.vocab_size)
        got = Compose([DropLayers(layers=[1]), d])(copy.deepcopy(dense), calib)
    for k, a in before.items():
        assert torch.equal(a, dense.state_dict()[k]), k
    assert d.report_.teacher_correction_seconds > 0 and "correcting the teacher" in d.summary()
    for (k, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0 if path == "teacher_model" else 2e-4, msg=k)
    with pytest.raises(ConfigError, match="teacher_correction_steps"):
        Distill(**cfg, teacher_model=dense, teacher_correction_steps=-1)(copy.deepcopy(dense), calib)


def test_named_teachers_and_errors(tiny):
    dense, calib = tiny
    d = Distill(steps=1, batch_size=2, teachers=["tiny-llama"])  # loaded by name
    d(DropLayers(layers=[1])(copy.deepcopy(dense)), calib)
    assert d.report_.teachers == 1
    student = DropLayers(layers=[1])(copy.deepcopy(dense))
    with pytest.raises(ConfigError, match="needs a teacher"):
        Distill()(student, calib)
    bad = [{"loss": "mse"}, {"train": "some"}, {"teacher_combine": "uncertainty"}, {"teacher_combine": "confidence"},
           {"teacher_top_k": 8, "teacher_model": [dense, dense]}, {"on_policy": 0.5, "teacher_top_k": 8},
           {"teacher_weights": [1.0, 2.0]}, {"select_fraction": 0.0}, {"hidden_weight": 1.0, "teacher_top_k": 8},
           {"hidden_weight": 1.0, "teacher_model": [dense, dense]}, {"hidden_weight": -1.0}]
    for kw in bad:
        with pytest.raises(ConfigError):
            Distill(**{"teacher_model": dense, **kw})(student, calib)
    ce_only = Distill(steps=1, batch_size=2, ce_weight=1.0)  # cross-entropy alone needs no teacher
    ce_only(student, calib)
    assert ce_only.report_.teachers == 0


def test_readme_quotes_the_distill_benchmark():
    """The README's distillation numbers are those of benchmarks/results/distill/distill.json."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    res = json.loads((root / "benchmarks/results/distill/distill.json").read_text())
    readme = " ".join((root / "README.md").read_text().split())
    rec, multi = res["recovery"], res["multi"]
    assert f"windows (dense {rec['dense']['ppl']:.2f}" in readme
    if "dense + CE" in rec:
        assert f"the dense model fine-tuned the same way: {rec['dense + CE']['ppl']:.2f}" in readme
    quoted = 0
    for start in ("shortgpt-8", "slicegpt-25"):
        if f"{start} + KD" not in rec or f"{start} + CE" not in rec:
            continue
        s, dense = rec[start]["ppl"], rec["dense"]["ppl"]
        ce, kd = rec[f"{start} + CE"]["ppl"], rec[f"{start} + KD"]["ppl"]
        assert f"{start}: start {s:.2f}, LoRA cross-entropy {ce:.2f} ({(s - ce) / (s - dense):.1%} of the gap " \
               f"recovered), KD {kd:.2f} ({(s - kd) / (s - dense):.1%})" in readme
        if f"{start} + KD, corrected teacher" in rec:
            kdc = rec[f"{start} + KD, corrected teacher"]["ppl"]
            assert f"KD from the corrected teacher {kdc:.2f} ({(s - kdc) / (s - dense):.1%})" in readme
        if f"{start} + KD + CE, corrected teacher" in rec:
            mix = rec[f"{start} + KD + CE, corrected teacher"]["ppl"]
            assert f"KD + CE in equal parts from the corrected teacher {mix:.2f} ({(s - mix) / (s - dense):.1%})" \
                in readme
        if f"{start} + KD (T=2) + CE, corrected teacher" in rec:
            hot = rec[f"{start} + KD (T=2) + CE, corrected teacher"]["ppl"]
            assert f"the same at temperature 2 {hot:.2f} ({(s - hot) / (s - dense):.1%})" in readme
        for label, words in (("KD + CE + hidden states", "adding TinyBERT's hidden-state matching through learned "
                                                        "projections,"), ("skew KD + CE", "skew KL in place of the forward KL,")):
            if f"{start} + {label}, corrected teacher" in rec:
                v = rec[f"{start} + {label}, corrected teacher"]["ppl"]
                assert f"{words} {v:.2f} ({(s - v) / (s - dense):.1%})" in readme
        if f"{start} + KD + CE, fine-tuned teacher" in rec:
            v = rec[f"{start} + KD + CE, fine-tuned teacher"]["ppl"]
            assert f"{start} {v:.2f} ({(s - v) / (s - dense):.1%}) against {ce:.2f} ({(s - ce) / (s - dense):.1%})" \
                in readme
            assert f"perplexity {rec['fine-tuned teacher']['ppl']:.2f}" in readme
        quoted += 1
        ce32, skew32 = rec.get(f"{start} + CE (32 steps)"), rec.get(f"{start} + skew KD + CE, corrected teacher (32 steps)")
        if ce32 and skew32:
            assert (f"{start} at 32 steps: LoRA cross-entropy {ce32['ppl']:.2f} "
                    f"({(s - ce32['ppl']) / (s - dense):.1%} of the gap recovered), skew KD + CE from the corrected "
                    f"teacher {skew32['ppl']:.2f} ({(s - skew32['ppl']) / (s - dense):.1%})") in readme
            assert f"the dense model fine-tuned the same way for 32 steps: {rec['dense + CE (32 steps)']['ppl']:.2f}" \
                in readme
    assert quoted
    for name, r in multi.items():
        if not name.startswith(("fine-tune", "dense", "shortgpt")):
            p = r["ppl"]
            nll = (math.log(p["shakespeare"]) + math.log(p["pystdlib"])) / 2
            assert f"{name}: {p['shakespeare']:.2f} / {p['pystdlib']:.2f} (mean NLL {nll:.4f})" in readme
