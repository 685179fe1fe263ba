"""PV-Tuning: the V step's subspace limit, representable weights, P and V each lowering the loss,
the teacher of a recipe, save/load and resume."""

import copy
import math

import pytest
import torch

import llmdeploy
from llmdeploy.compress.base import Compose
from llmdeploy.distill.losses import kl_full, kl_topk
from llmdeploy.distill.teacher import TopKCache
from llmdeploy.errors import CheckpointError, ConfigError
from llmdeploy.kernels import use_reference
from llmdeploy.prune import Magnitude
from llmdeploy.quant import AQLM, RTN, AQLMLinear, PVTuning, RTNLinear
from llmdeploy.quant.aqlm import encode_groups_l2
from llmdeploy.quant.aqlm_linear import unpack_codes

from .conftest import ids_for, interrupt_at

QUANTIZERS = {
    "rtn": lambda: RTN(bits=2, group_size=32),
    "aqlm": lambda: AQLM(num_codebooks=2, nbits_per_codebook=4, in_group_size=8, max_iter=1, steps_per_round=2,
                         kmeans_iters=4, finetune_blocks=False),
}


def quantized(kind, calib):
    model, _ = llmdeploy.load("tiny-llama")
    return QUANTIZERS[kind]()(model, calib)


def codes_of(model):
    """Every quantized linear's codes: AQLM per tile (all codebooks), RTN per weight."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, AQLMLinear):
            out[name] = unpack_codes(m.codes, m.nbits_per_codebook).clone()
        elif isinstance(m, RTNLinear):
            out[name] = m.codes().clone()
    return out


def changed_groups(before, after):
    return {n: int((before[n] != after[n]).any(-1).sum()) if before[n].dim() == 3 else int((before[n] != after[n]).sum())
            for n in before}


def groups(codes):
    return codes.shape[0] * codes.shape[1] if codes.dim() == 3 else codes.numel()


def kl_on(model, teacher, ids):
    with torch.no_grad():
        return float(kl_full(model(input_ids=ids).logits, teacher(input_ids=ids).logits))


@pytest.fixture(scope="module")
def setup():
    dense, tok = llmdeploy.load("tiny-llama")
    return dense.eval(), tok, ids_for(tok, n=4, seq=32)


def test_encode_groups_l2_is_exact_for_one_codebook_and_never_worse():
    g = torch.Generator().manual_seed(0)
    books = torch.randn(2, 16, 1, 4, generator=g)
    target = torch.randn(50, 4, generator=g)
    start = torch.randint(0, 16, (50, 2), generator=g)

    def err(codes):
        return ((target - books[0, codes[:, 0], 0] - books[1, codes[:, 1], 0]) ** 2).sum(-1)

    for beam in (1, 4):
        new = encode_groups_l2(target, start, books, beam)
        assert (err(new) <= err(start) + 1e-6).all()
    one = encode_groups_l2(target, start[:, :1], books[:1], 1)  # one codebook: the nearest codeword
    assert torch.equal(one[:, 0], torch.cdist(target, books[0, :, 0]).argmin(1))
    exhaustive = torch.stack([err(torch.tensor([[a, b]] * 50)) for a in range(16) for b in range(16)]).min(0).values
    assert (err(encode_groups_l2(target, start, books, 256)) <= exhaustive + 1e-5).all()  # full beam = exhaustive


def test_beam_one_is_a_greedy_sweep_equal_to_the_beam_search():
    """At beam 1 the re-encoding takes the matrix-product path; it must pick what the beam search
    with one hypothesis picks (the same codes, up to float near-ties) and never end worse."""
    from llmdeploy.quant.aqlm import _beam_search, _greedy_sweep

    g = torch.Generator().manual_seed(1)
    books = torch.randn(2, 256, 8, generator=g)
    norms = (books * books).sum(-1)
    target = torch.randn(5000, 8, generator=g)
    start = torch.randint(0, 256, (5000, 2), generator=g)

    def err(codes):
        return ((target - books[0, codes[:, 0]] - books[1, codes[:, 1]]) ** 2).sum(-1)

    fast = _greedy_sweep(target, start, books, norms, chunk=777)  # chunks of any size
    ref = _beam_search(target, start, books, norms, 1, chunk=1000)
    assert (fast == ref).all(-1).float().mean() > 0.999
    torch.testing.assert_close(err(fast), err(ref), rtol=1e-5, atol=1e-5)
    assert (err(fast) <= err(start) + 1e-5).all() and err(fast).mean() < 0.5 * err(start).mean()
    assert fast.dtype == start.dtype and torch.equal(start, start.clone())


@pytest.mark.parametrize("kind", ["rtn", "aqlm"])
def test_v_step_changes_at_most_max_code_change_and_weights_stay_representable(setup, kind):
    dense, tok, calib = setup
    model = quantized(kind, calib)
    frac, steps = 0.02, 3
    before = codes_of(model)
    pv = PVTuning(mode="pv", steps=steps, batch_size=2, lr=1e-3, code_lr=2e-2, max_code_change=frac, beam_size=2,
                  teacher_model=dense, eval_windows=calib[:2], eval_every=steps)
    model = pv(model, calib)
    after = codes_of(model)
    changed = changed_groups(before, after)
    assert sum(changed.values()) > 0  # the V step did move codes
    for name, n in changed.items():  # per step at most ceil(frac * groups) of each weight's groups
        assert n <= steps * math.ceil(frac * groups(before[name])), name
    total = sum(groups(c) for c in before.values())
    assert all(c <= frac + len(before) / total for c in pv.report_.code_change)
    # what was trained is what is stored: the last held-out perplexity (measured with the training
    # weights) equals the saved format's, decoded from the stored codes by the reference path
    with torch.no_grad(), use_reference():
        logits = model(input_ids=calib[:2]).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), calib[:2, 1:].flatten())
    assert math.exp(float(nll)) == pytest.approx(pv.report_.eval_ppl[-1], rel=1e-5)
    for m in model.modules():
        if isinstance(m, RTNLinear):
            assert m.scales.dtype == torch.float16 and m.qweight.dtype == torch.uint8
        if isinstance(m, AQLMLinear):
            assert not m.codebooks.requires_grad


@pytest.mark.parametrize("kind", ["rtn", "aqlm"])
def test_trust_ratio_keeps_the_farthest_changes_within_its_bound(setup, kind):
    """The V step's projection under ``code_trust_ratio``: the changes kept are a prefix of the
    farthest-first order whose norm is within ratio · ‖Ŵ‖ plus one group; the rest are undone."""
    from llmdeploy.quant.pv_tuning import REPRESENTATIONS

    dense, tok, calib = setup
    model = quantized(kind, calib)
    name, mod = next((n, m) for n, m in model.named_modules() if type(m) in REPRESENTATIONS)
    g = torch.Generator().manual_seed(0)
    for ratio in (1e-3, 3e-2):
        rep = REPRESENTATIONS[type(mod)](copy.deepcopy(mod))
        before = rep.dequantize().detach()
        buf = before + 0.5 * before.std() * torch.randn(before.shape, generator=g)  # far: most groups want to move
        k = max(2, rep.n_groups // 10)
        groups = torch.topk(rep.group_errors(buf - before), k, sorted=True).indices
        old = rep.group_codes(groups).reshape(k, -1)
        unbounded = REPRESENTATIONS[type(mod)](copy.deepcopy(mod))
        unbounded.encode(buf, groups, 2)
        free = unbounded.group_codes(groups).reshape(k, -1)
        n_changed = PVTuning(mode="pv", code_trust_ratio=ratio, beam_size=2)._encode_within_trust(
            rep, buf, groups, before, ratio)
        now = rep.group_codes(groups).reshape(k, -1)
        differs = (now != old).any(-1)
        assert n_changed == int(differs.sum()) > 0
        last = int(differs.nonzero().max())
        assert torch.equal(now[:last + 1], free[:last + 1])  # the kept prefix took the unbounded step's codes
        assert torch.equal(now[last + 1:], old[last + 1:])  # the rest undone ...
        assert (free[last + 1:] != old[last + 1:]).any()  # ... though the unbounded step changed some of them
        moved = rep.group_errors(rep.dequantize().detach() - before)
        budget = ratio * float(before.norm())
        assert float(moved[groups[:last]].sum().sqrt()) <= budget + 1e-6  # within the bound but for one group
        assert float(moved[groups[:last + 1]].sum().sqrt()) >= budget - 1e-6  # which crossed it: the prefix is the longest
        assert float(moved.sum() - moved[groups].sum()) == 0  # unselected groups untouched


@pytest.mark.parametrize("kind", ["rtn", "aqlm"])
def test_p_step_and_v_step_each_lower_the_training_loss(setup, kind):
    dense, tok, calib = setup
    base = quantized(kind, calib)
    start = kl_on(base, dense, calib)
    before = codes_of(base)

    p_only = PVTuning(mode="p_only", steps=8, batch_size=4, lr=1e-3, teacher_model=dense)(copy.deepcopy(base), calib)
    assert kl_on(p_only, dense, calib) < 0.9 * start
    assert all(torch.equal(before[n], c) for n, c in codes_of(p_only).items())  # P never touches codes
    v_only = PVTuning(mode="v_only", steps=8, batch_size=4, code_lr=1e-2, max_code_change=0.05, beam_size=2,
                      code_trust_ratio=None, teacher_model=dense)(copy.deepcopy(base), calib)
    assert kl_on(v_only, dense, calib) < 0.97 * start
    bounded = PVTuning(mode="v_only", steps=8, batch_size=4, code_lr=1e-2, max_code_change=0.05, beam_size=2,
                       teacher_model=dense)(copy.deepcopy(base), calib)  # the default trust ratio: smaller steps
    assert kl_on(bounded, dense, calib) < start
    for name, m in v_only.named_modules():  # V never touches the continuous parameters
        if isinstance(m, AQLMLinear):
            assert torch.equal(m.codebooks, base.get_submodule(name).codebooks)
        if isinstance(m, RTNLinear):
            assert torch.equal(m.scales, base.get_submodule(name).scales)


def test_recipe_distils_from_the_model_it_started_from(setup):
    dense, tok, calib = setup
    model, _ = llmdeploy.load("tiny-llama")
    rtn_alone = RTN(bits=2, group_size=32)(llmdeploy.load("tiny-llama")[0], calib)
    pv = PVTuning(steps=2, batch_size=4, microbatch_size=4, lr=1e-3)
    model = Compose([RTN(bits=2, group_size=32), pv])(model, calib)
    # step 1's loss is the KL from the dense start to the RTN model, on the step's windows (all four)
    assert pv.report_.history[0] == pytest.approx(kl_on(rtn_alone, dense, calib), rel=1e-4)
    assert pv._start is None  # the kept teacher is released after the step
    assert [s["method"] for s in model.config.llmdeploy_recipe] == ["rtn", "pv_tuning"]


def test_top_k_teacher_cache(setup, tmp_path):
    dense, tok, calib = setup
    vocab = dense.config.vocab_size
    student = RTN(bits=2, group_size=32)(llmdeploy.load("tiny-llama")[0], calib)
    with torch.no_grad():
        s, t = student(input_ids=calib).logits, dense(input_ids=calib).logits
    full = kl_full(s, t)
    for k in (1, 8, 64):  # the coarsened KL never exceeds the full one, and grows with k
        v, i = torch.topk(torch.log_softmax(t, -1), k)
        assert float(kl_topk(s, v, i)) <= float(full) + 1e-6
    v, i = torch.topk(torch.log_softmax(t, -1), vocab)
    assert float(kl_topk(s, v, i)) == pytest.approx(float(full), rel=1e-4)  # k = vocabulary: exact
    cache = TopKCache(dense, calib, 8, tmp_path / "c")
    logp, ids = cache[[2, 0]]
    ref_v, ref_i = torch.topk(torch.log_softmax(t[[2, 0]], -1), 8)
    assert torch.equal(ids.long(), ref_i) and torch.allclose(logp, ref_v)
    mtime = (tmp_path / "c" / "topk_logp.f32").stat().st_mtime_ns
    TopKCache(dense, calib, 8, tmp_path / "c")  # same teacher, windows and k: reused, not recomputed
    assert (tmp_path / "c" / "topk_logp.f32").stat().st_mtime_ns == mtime
    # in a recipe with teacher_top_k the dense model is reduced to the cache before quantizing
    pv = PVTuning(steps=2, batch_size=2, teacher_top_k=16, teacher_cache=str(tmp_path / "r"))
    Compose([RTN(bits=2, group_size=32), pv])(llmdeploy.load("tiny-llama")[0], calib)
    assert len(pv.report_.history) == 2 and (tmp_path / "r" / "topk.json").exists()


def test_pv_after_aqlm_saves_and_loads(setup, tmp_path):
    dense, tok, calib = setup
    model = quantized("aqlm", calib)
    model = PVTuning(steps=2, batch_size=2, teacher_model=dense, max_code_change=0.05)(model, calib)
    llmdeploy.save(model, tok, tmp_path / "m")
    back, _ = llmdeploy.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=calib).logits, model(input_ids=calib).logits, rtol=0, atol=0)
    assert [s["method"] for s in back.config.llmdeploy_recipe] == ["aqlm", "pv_tuning"]


@pytest.mark.parametrize("kind", ["rtn", "aqlm"])
def test_resume_equals_uninterrupted_run(setup, tmp_path, kind):
    dense, tok, calib = setup
    cfg = dict(steps=6, batch_size=2, lr=1e-3, max_code_change=0.05, beam_size=2, teacher_model=dense)
    ref = PVTuning(**cfg)(quantized(kind, calib), calib)
    model = quantized(kind, calib)
    handle = interrupt_at(model, 9)  # micro-batches of 1, two per step: dies in step 5, after the step-4 save
    with pytest.raises(KeyboardInterrupt):
        PVTuning(**cfg, checkpoint_dir=str(tmp_path), save_every=2)(model, calib)
    handle.remove()
    pv = PVTuning(**cfg, checkpoint_dir=str(tmp_path), save_every=2, resume=True)
    fresh = pv(quantized(kind, calib), calib)
    assert pv.report_.resumed_at == 4 and len(pv.report_.history) == 6
    for (k, a), b in zip(ref.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    with pytest.raises(CheckpointError, match="different PV-Tuning run"):
        PVTuning(**{**cfg, "lr": 5e-4}, checkpoint_dir=str(tmp_path), resume=True)(quantized(kind, calib), calib)


def test_pv_tuning_errors(setup):
    dense, tok, calib = setup
    with pytest.raises(ConfigError, match="no quantized linear"):
        PVTuning(teacher_model=dense)(llmdeploy.load("tiny-llama")[0], calib)
    q = quantized("rtn", calib)
    with pytest.raises(ConfigError, match="teacher_model"):
        PVTuning()(q, calib)
    for bad in ({"max_code_change": 0.0}, {"mode": "sgd"}, {"loss": "mse"}, {"steps": 0}, {"resume": True},
                {"code_trust_ratio": 0.0}):
        with pytest.raises(ConfigError):
            PVTuning(teacher_model=dense, **bad)(q, calib)
    sparse = Magnitude(sparsity=0.5)(llmdeploy.load("tiny-llama")[0], calib)
    with pytest.raises(ConfigError, match="no representation for SparseLinear"):
        PVTuning(teacher_model=dense)(sparse, calib)
    other, _ = llmdeploy.load("tiny-llama")
    other.resize_token_embeddings(300)
    with pytest.raises(ConfigError, match="vocabulary"):
        PVTuning(teacher_model=other)(q, calib)


def test_readme_quotes_the_pv_tuning_benchmark():
    """The README's PV-Tuning perplexities are those of benchmarks/results/pv_tuning/pv_tuning.json."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    res = json.loads((root / "benchmarks/results/pv_tuning/pv_tuning.json").read_text())
    readme = " ".join((root / "README.md").read_text().split())
    rows = res["rows"]
    bases = [b for b in rows if "+" not in b and all(f"{b}+{m}" in rows for m in ("p_only", "ste", "pv"))]
    assert bases and f"(dense {res['dense']:.2f})" in readme
    for b in bases:
        r = [rows[b]["ppl"]] + [rows[f"{b}+{m}"]["ppl"] for m in ("p_only", "ste", "pv")]
        assert f"{b}: calibration alone {r[0]:.2f}, P-only {r[1]:.2f}, STE {r[2]:.2f}, PV {r[3]:.2f}" in readme
        for m, label in (("p_only", "P-only"), ("ste", "STE"), ("pv", "PV")):  # from another build: said so
            row = rows[f"{b}+{m}"]
            if row.get("base_build") != rows[b].get("base_build"):
                assert f"{label} from a rebuilt base (held-out perplexity at step 0 {row['eval_ppl'][0]:.1f}" in readme
    for name, row in rows.items():  # a rebuilt base: its rows quoted together
        if "(build" in name and "+" not in name:
            base, build = name.split(" ")[0], row["base_build"]
            # this build's runs at the table's steps and code_lr; STE with P-only's trust ratio
            of = {m: [r for n, r in rows.items() if n.startswith(f"{base}+{m}") and "@" not in n and "/lr" not in n
                      and r.get("base_build") == build] for m in ("p_only", "ste")}
            p_only = of["p_only"]
            ste = [r for r in of["ste"] if p_only and r.get("trust") == p_only[-1].get("trust")]
            if p_only and ste:
                p, st = p_only[-1], ste[0]
                assert f"on the rebuilt base alone: calibration alone {row['ppl']:.2f}, P-only {p['ppl']:.2f}, STE {st['ppl']:.2f}" \
                    in readme
                assert f"P-only {p['eval_ppl'][-1]:.1f}, STE {st['eval_ppl'][-1]:.1f})" in readme
    for name, row in rows.items():  # runs with the trust ratio or with code_lr recorded: quoted with their held-out curve
        if "/trust" in name or (row.get("code_lr") is not None):
            curve = ", ".join(f"{p:.1f}" for p in row["eval_ppl"][1:])
            assert f"`{name}`: {row['ppl']:.2f} (held-out perplexity at steps 5–20: {curve}" in readme
    for name, row in rows.items():  # longer runs than the table's: their own sentence
        if "@" in name:
            base, mode = name.split("@")[0].split("+")
            ppl = row["ppl"]
            assert (f"{base} + {mode} for {row['steps']} steps: {ppl:.2f} ({ppl / res['dense']:.3f}x dense) "
                    f"in {row['seconds'] / 60:.0f} min") in readme


def test_readme_quotes_the_full_scoreboard_pv_rows():
    """The README's full-scoreboard PV-Tuning rows are those of benchmarks/results/full/*.json, with
    the share of code groups each step changed (from the run's report)."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = " ".join((root / "README.md").read_text().split())
    rows = {p.stem: json.loads(p.read_text()) for p in (root / "benchmarks/results/full").glob("*.json")}
    tuned = {n: r for n, r in rows.items() if r["recipe"] and r["recipe"][-1]["method"] == "pv_tuning"}
    quoted = [n for n in rows if "pv" in n or "aqlm" in n or n in {r["meta"]["base"] for r in tuned.values()}]
    assert tuned and quoted
    for name in quoted:
        assert f"`{name}`: {rows[name]['perplexity']['shakespeare']['ppl']:.2f}" in readme
    for r in tuned.values():
        change = r["meta"]["report"]["code_change"]
        if r["recipe"][-1]["mode"] == "p_only":  # codes frozen
            assert not any(change)
            continue
        assert f"{100 * sum(change) / len(change):.2g}% of the code groups changed per step" in readme
        assert r["recipe"][-1]["code_trust_ratio"] == 0.01 and "trust ratio 1e-2" in readme
