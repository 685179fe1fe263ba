"""llmdeploy.decode: tree verification is lossless for every drafter, the tree layout and the
compacted cache are right, and rejection sampling draws from the model's distribution."""

import contextlib
import copy

import pytest
import torch
from scipy.stats import chisquare

import llmdeploy
from llmdeploy import decode as D
from llmdeploy.decode.engine import Runner, target_probs
from llmdeploy.errors import CheckpointError, ConfigError

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11, 40, 41]]


@pytest.fixture(scope="module")
def tiny():
    model, tok = llmdeploy.load("tiny-llama")
    return model.eval(), tok


def hf_greedy(model, prompts, n):
    out = []
    for p in prompts:
        g = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(g[0, len(p):].tolist())
    return out


def random_drafters(model):
    """Untrained drafters with random weights (their guesses are mostly wrong, sometimes right)."""
    torch.manual_seed(0)
    medusa = D.MedusaHeads.for_model(model, 3, tree=10, topk=4)
    hidden = D.HiddenTransfer.for_model(model, n_future=2, tree=6, topk=3)
    for d in (medusa, hidden):
        for p in d.parameters():
            p.data.add_(torch.randn_like(p) * 0.2)
    main = copy.deepcopy(hidden)
    main.pseudo_on = "main"
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return {
        "medusa": medusa,
        "redrafter": D.ReDrafter.for_model(model, beam_width=3, beam_length=3),
        "hidden_transfer": hidden,
        "hidden_transfer_main": main,
        "draft_model": D.DraftModel(draft, n_draft=3),
    }


def test_redrafter_beam_search_of_a_batch_equals_each_row_alone(tiny):
    """The batched beam search (one drafter/LM-head pass per beam step for all rows) proposes, for
    every row, the tree that row gets when it is searched on its own."""
    model, _ = tiny
    torch.manual_seed(1)
    rd = D.ReDrafter.for_model(model, beam_width=3, beam_length=3)
    for p in rd.parameters():
        p.data.add_(torch.randn_like(p) * 0.3)
    rd.begin(Runner(model, 3), PROMPTS)
    hidden = torch.randn(3, model.config.hidden_size)
    together = rd.propose([0, 1, 2], [5, 17, 40], hidden)
    for b, root in enumerate([5, 17, 40]):
        alone = rd.propose([b], [root], hidden[b:b + 1])[0]
        assert (together[b].tokens, together[b].parents, together[b].count) == (alone.tokens, alone.parents, alone.count)
        assert together[b].num_candidates > 3  # 3 beams of 3 tokens: more than one chain


# --- the tree layout ---------------------------------------------------------------------------
def test_tree_mask_and_positions_match_a_hand_built_tree():
    #        0 (root)
    #       / \
    #      1   2
    #      |   |
    #      3   5
    #      |
    #      4
    tree = D.TokenTree([100, 101, 102, 103, 104, 105], [-1, 0, 0, 1, 3, 2])
    short = D.TokenTree.chain([7, 8])
    ids, pos, mask = D.tree_inputs([tree, short], torch.tensor([3, 1]))
    assert ids.tolist() == [[100, 101, 102, 103, 104, 105], [7, 8, 0, 0, 0, 0]]
    assert pos[0].tolist() == [3, 4, 4, 5, 6, 5]
    assert pos[1, :2].tolist() == [1, 2]
    seen = mask[:, 0] == 0  # (B, T, L) with L = 3 + 6
    assert seen.shape == (2, 6, 9)
    ancestors = {0: [0], 1: [0, 1], 2: [0, 2], 3: [0, 1, 3], 4: [0, 1, 3, 4], 5: [0, 2, 5]}
    for i, anc in ancestors.items():
        expect = [True] * 3 + [j in anc for j in range(6)]
        assert seen[0, i].tolist() == expect, i
    # row 1: one cached token, then its chain; padding queries see the context and themselves
    assert seen[1, 0].tolist() == [True, True] + [False] * 7
    assert seen[1, 1].tolist() == [True, True, True] + [False] * 6
    assert seen[1, 4].tolist() == [True] + [False] * 4 + [True] + [False] * 3  # its own slot 1 + 4


def test_prefix_tree_merges_beams_and_counts_draws():
    tree = D.TokenTree.from_paths(9, [[1, 2, 3], [1, 2, 4], [1, 5, 6], [1, 2, 3]])
    assert tree.tokens == [9, 1, 2, 3, 4, 5, 6]
    assert tree.parents == [-1, 0, 1, 2, 2, 1, 5]
    assert tree.count == [1, 4, 3, 2, 1, 1, 1]
    assert tree.num_candidates == 6


def test_best_tree_takes_the_most_likely_paths_first():
    acc = torch.tensor([[0.5, 0.3], [0.4, 0.1]])
    assert D.best_tree(acc, 3) == [(0,), (1,), (0, 0)]
    assert D.best_tree(acc, 5) == [(0,), (1,), (0, 0), (0, 1), (1, 0)]
    with pytest.raises(ConfigError):
        D.static_tree([(0, 1)])  # no parent (0,)


# --- lossless greedy -----------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_output_equals_plain_greedy_for_every_drafter(tiny, batch):
    model, _ = tiny
    prompts = PROMPTS[:batch] if batch > 1 else PROMPTS[2:]
    ref = hf_greedy(model, prompts, 18)
    assert D.generate(model, None, prompts, 18).sequences == ref
    for name, drafter in random_drafters(model).items():
        out = D.generate(model, None, prompts, 18, drafter=drafter)
        assert out.sequences == ref, name
        assert out.stats.mean_tree > 0, name


def test_folded_gqa_attention_equals_attention_over_repeated_keys(tiny):
    """Tree forwards of a grouped-query model attend with the query heads of a group folded into
    rows (no per-head copy of the cache): the same output as transformers' SDPA over repeated keys,
    for a tree mask with masked-out cache slots; one query, or no mask, goes to transformers."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from llmdeploy.decode.attention import ATTN_IMPLEMENTATION, folded_gqa, folded_gqa_attention

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    B, Hk, T, L, Dh = 2, 2, 5, 19, 8
    q, k, v = torch.randn(B, Hk * 3, T, Dh), torch.randn(B, Hk, L, Dh), torch.randn(B, Hk, L, Dh)
    allowed = torch.rand(B, 1, T, L) > 0.4
    allowed[..., -T:] = torch.eye(T, dtype=torch.bool)  # every node sees itself
    for mask in (allowed, torch.zeros(B, 1, T, L).masked_fill(~allowed, float("-inf")), None):
        ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
        out, _ = folded_gqa_attention(module, q, k, v, mask, scaling=0.3)
        assert out.shape == (B, T, Hk * 3, Dh)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # the fold repeats a mask once per forward (every layer gets the same tensor): a mask changed in
    # place, or a module with another group size, must not reuse the last repetition
    mask = torch.zeros(B, 1, T, L).masked_fill(~allowed, float("-inf"))
    folded_gqa_attention(module, q, k, v, mask, scaling=0.3)
    mask[:, :, :, 0] = float("-inf")
    torch.testing.assert_close(folded_gqa_attention(module, q, k, v, mask, scaling=0.3)[0],
                               sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)[0], rtol=1e-5, atol=1e-6)
    other = torch.nn.Module()
    other.num_key_value_groups = 2
    q2 = torch.randn(B, Hk * 2, T, Dh)
    torch.testing.assert_close(folded_gqa_attention(other, q2, k, v, mask, scaling=0.3)[0],
                               sdpa_attention_forward(other, q2, k, v, mask, scaling=0.3)[0], rtol=1e-5, atol=1e-6)
    one, _ = folded_gqa_attention(module, q[:, :, :1], k, v, allowed[:, :, :1], scaling=0.3)
    torch.testing.assert_close(one, sdpa_attention_forward(module, q[:, :, :1], k, v, allowed[:, :, :1], scaling=0.3)[0])

    model, _ = tiny
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # the tiny Llama is GQA
    trees = [D.TokenTree([5, 6, 7, 8, 9], [-1, 0, 0, 1, 1]), D.TokenTree([3, 4, 40, 41, 42], [-1, 0, 1, 0, 3])]
    outs = []
    for fold in (False, True):
        runner = Runner(model, 2)
        runner.forward([D.TokenTree.chain(p) for p in PROMPTS[:2]])
        runner.cache.commit([range(len(p)) for p in PROMPTS[:2]])
        with folded_gqa(model) if fold else contextlib.nullcontext():
            assert model.config._attn_implementation == (ATTN_IMPLEMENTATION if fold else "sdpa")
            outs.append(runner.forward(trees)[0])
        assert model.config._attn_implementation == "sdpa"  # restored
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_draft_model_equal_to_the_model_accepts_everything(tiny):
    model, _ = tiny
    out = D.generate(model, None, PROMPTS, 17, drafter=D.DraftModel(model, n_draft=3))
    assert out.sequences == hf_greedy(model, PROMPTS, 17)
    assert out.stats.mean_accepted == pytest.approx(4.0, abs=0.34)  # only a final short step may accept less


@pytest.mark.parametrize("family", ["tiny-opt", "tiny-qwen2"])
def test_greedy_is_lossless_on_other_families(family):
    model, _ = llmdeploy.load(family)
    model.eval()
    ref = hf_greedy(model, PROMPTS, 12)
    for name, drafter in random_drafters(model).items():
        assert D.generate(model, None, PROMPTS, 12, drafter=drafter).sequences == ref, (family, name)


def test_verifier_may_be_a_compressed_model(tiny):
    from llmdeploy.data import calibration
    from llmdeploy.prune import SliceGPT
    from llmdeploy.quant import RTN

    model, tok = tiny
    calib = calibration(tok, n_samples=8, seq_len=32)
    for compressed in (RTN(bits=4, group_size=16)(copy.deepcopy(model)),
                       SliceGPT(sparsity=0.25)(copy.deepcopy(model), calib)):
        ref = D.generate(compressed, None, PROMPTS, 12).sequences
        med = D.MedusaHeads.for_model(compressed, 2, tree=6, topk=3)
        assert D.generate(compressed, None, PROMPTS, 12, drafter=med).sequences == ref
        assert D.generate(compressed, None, PROMPTS, 12, drafter=D.DraftModel(model, 2)).sequences == ref


def test_eos_ends_each_row_at_its_own_time(tiny):
    model, _ = tiny
    full = D.generate(model, None, PROMPTS, 16).sequences
    eos = full[0][5]
    out = D.generate(model, None, PROMPTS, 16, drafter=random_drafters(model)["redrafter"], eos_token_id=eos)
    for seq, ref in zip(out.sequences, full):
        cut = ref.index(eos) + 1 if eos in ref else len(ref)
        assert seq == ref[:cut]


# --- the cache after compaction --------------------------------------------------------------------
def test_cache_after_compaction_equals_plain_decoding_of_the_accepted_tokens(tiny):
    model, _ = tiny
    prompts = [[5, 6, 7, 8], [9, 10]]
    tree_runner, plain = Runner(model, 2), Runner(model, 2)
    for r in (tree_runner, plain):
        r.forward([D.TokenTree.chain(p) for p in prompts])
        r.cache.commit([range(len(p)) for p in prompts])
    trees = [D.TokenTree([20, 21, 22, 23, 24], [-1, 0, 0, 2, 3]), D.TokenTree([30, 31, 32], [-1, 0, 0])]
    tree_runner.forward(trees)
    keep = [[0, 2, 3, 4], [0, 2]]  # row 0 accepts the path 20-22-23-24, row 1 the path 30-32
    tree_runner.cache.commit(keep)
    accepted = [[20, 22, 23, 24], [30, 32]]
    plain.forward([D.TokenTree.chain(a) for a in accepted])
    plain.cache.commit([range(len(a)) for a in accepted])
    assert tree_runner.cache.lengths.tolist() == plain.cache.lengths.tolist() == [8, 4]
    for b in range(2):
        for layer in range(len(plain.cache.keys)):
            for got, want in zip(tree_runner.cache.row(b, layer), plain.cache.row(b, layer)):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- sampling ------------------------------------------------------------------------------------
def test_rejection_sampling_on_a_tree_draws_from_the_target():
    """Synthetic target and drafter over 5 tokens: whatever the drafts, the first emitted token
    is distributed as p(. | root) and the second, given the first, as p(. | first)."""
    g = torch.Generator().manual_seed(0)
    V = 5
    p_root = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    p_next = torch.softmax(torch.randn(V, V, generator=g), -1)  # p(. | first token)
    q_root = torch.tensor([0.1, 0.2, 0.5, 0.1, 0.1])
    q_next = torch.softmax(torch.randn(V, V, generator=g), -1)
    firsts, seconds = [], []
    n = 6000
    for _ in range(n):
        draws = torch.multinomial(q_root, 3, replacement=True, generator=g).tolist()
        paths = [[a, int(torch.multinomial(q_next[a], 1, generator=g))] for a in draws]
        tree = D.TokenTree.from_paths(0, paths)
        tree.q = {0: q_root, **{i: q_next[tree.tokens[i]] for i in range(1, len(tree)) if tree.parents[i] == 0}}
        probs = torch.zeros(len(tree), V)
        probs[0] = p_root
        for i in range(1, len(tree)):
            probs[i] = p_next[tree.tokens[i]] if tree.parents[i] == 0 else p_root  # depth 2: any p
        path, nxt = D.accept_rejection(tree, probs, g)
        toks = [tree.tokens[i] for i in path[1:]] + [nxt]
        firsts.append(toks[0])
        if len(toks) > 1:
            seconds.append((toks[0], toks[1]))
    counts = torch.bincount(torch.tensor(firsts), minlength=V).float()
    assert chisquare(counts.numpy(), (p_root * n).numpy()).pvalue > 0.001
    for a in range(2):  # the two most common first tokens have enough seconds to test
        sec = torch.tensor([b for f, b in seconds if f == a])
        c = torch.bincount(sec, minlength=V).float()
        assert chisquare(c.numpy(), (p_next[a] * len(sec)).numpy()).pvalue > 0.001


@pytest.mark.parametrize("kind", ["draft_model", "redrafter", "redrafter with a drafting vocabulary"])
def test_sampled_generation_matches_the_model_distribution(tiny, kind):
    """Chi-square test of the second generated token (the first one that goes through rejection
    sampling) against the model's exact marginal, over 1500 rows of one seeded batch."""
    model, _ = tiny
    prompt, n, temp = [5, 6, 7, 8, 9], 1500, 0.7
    drafter = random_drafters(model)[kind.split(" with ")[0]]
    if "vocabulary" in kind:  # drafts from a quarter of the tokens: q is zero elsewhere
        drafter.set_draft_vocab(torch.arange(0, model.config.vocab_size, 4))
    out = D.generate(model, None, [prompt] * n, 2, drafter=drafter, temperature=temp, seed=1)
    second = torch.tensor([s[1] for s in out.sequences])
    with torch.no_grad():
        p1 = target_probs(model(torch.tensor([prompt])).logits[0, -1], temp)
        V = len(p1)
        both = torch.cat([torch.tensor([prompt]).repeat(V, 1), torch.arange(V)[:, None]], 1)
        p2 = target_probs(model(both).logits[:, -1], temp)
    marginal = (p1[:, None] * p2).sum(0)
    expected = marginal * n
    big = expected >= 5
    obs = torch.bincount(second, minlength=V).float()
    o = torch.cat([obs[big], obs[~big].sum()[None]])
    e = torch.cat([expected[big], expected[~big].sum()[None]])
    assert big.sum() >= 10
    assert chisquare(o.numpy(), e.numpy() * o.sum().item() / e.sum().item()).pvalue > 0.001


def test_drafting_vocabulary_drafts_only_its_tokens_and_stays_lossless(tiny, tmp_path):
    """FR-Spec's frequent-token drafting: the whole vocabulary in any order drafts the trees of no
    drafting vocabulary (the index mapping is right); a small one drafts only its tokens, greedy
    output stays plain greedy's, sampled drafts carry a full-vocabulary q that is zero outside it,
    and it is saved with the drafter."""
    model, _ = tiny
    V = model.config.vocab_size
    data = torch.tensor([7] * 5 + [3] * 5 + [9] * 2 + list(range(40, 80)))
    ids = D.frequent_tokens(data, 30, V)
    assert ids[:3].tolist() == [3, 7, 9] and len(set(ids.tolist())) == 30  # most frequent first, ties by id
    with pytest.raises(ConfigError, match="drafting vocabulary"):
        D.frequent_tokens(data, V + 1, V)
    hidden = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    roots = [5, 17, 40]
    for kind in ("medusa", "redrafter"):
        d = random_drafters(model)[kind]
        d.begin(Runner(model, 3), PROMPTS)
        ref = d.propose([0, 1, 2], roots, hidden)
        d.set_draft_vocab(torch.randperm(V, generator=torch.Generator().manual_seed(1)))
        d.begin(Runner(model, 3), PROMPTS)
        same = d.propose([0, 1, 2], roots, hidden)
        assert [(t.tokens, t.parents) for t in same] == [(t.tokens, t.parents) for t in ref]
        d.set_draft_vocab(ids)
        d.begin(Runner(model, 3), PROMPTS)
        small = d.propose([0, 1, 2], roots, hidden)
        assert all(set(t.tokens[1:]) <= set(ids.tolist()) and t.num_candidates for t in small)
        assert D.generate(model, None, PROMPTS, 10, drafter=d, eos_token_id=None).sequences == \
            hf_greedy(model, PROMPTS, 10)
        d.save(tmp_path / kind)
        back = D.load_drafter(tmp_path / kind)
        assert torch.equal(back.draft_vocab, ids) and back.config()["draft_vocab"] == 30
        with pytest.raises(ConfigError, match="distinct"):
            d.set_draft_vocab([1, 1, 2])
    d.begin(Runner(model, 1), [PROMPTS[0]], temperature=1.0, generator=torch.Generator().manual_seed(0))
    tree = d.propose([0], [5], hidden[:1])[0]
    outside = torch.ones(V, dtype=torch.bool)
    outside[ids] = False
    assert tree.q and all(q.shape == (V,) and abs(float(q.sum()) - 1) < 1e-5 and not q[outside].any()
                          for q in tree.q.values())


@pytest.mark.parametrize("kind", ["medusa", "redrafter"])
def test_quantized_drafter_drafts_from_codes_and_stays_lossless(tiny, kind):
    """Drafter.quantize: every linear of the drafter and its drafting-vocabulary head become RTN
    codes; at 8 bits its draft logits stay within 2% of the float drafter's largest logit; greedy
    output stays plain greedy decoding's at batch 1 and 3; the quantized cut of the head is kept
    across generations until the head's weight changes; what cannot be done says so."""
    from llmdeploy.quant.rtn import RTNLinear

    model, _ = tiny
    V, H = model.config.vocab_size, model.config.hidden_size
    d = random_drafters(model)[kind]
    d.set_draft_vocab(torch.arange(0, V, 2))
    n_linear = sum(type(m) is torch.nn.Linear for m in d.modules())
    q = copy.deepcopy(d).quantize(8, 32)
    assert q.quantized == (8, 32) and n_linear > 0
    assert not any(type(m) is torch.nn.Linear for m in q.modules())
    assert sum(isinstance(m, RTNLinear) for m in q.modules()) == n_linear
    runner = Runner(model, 3)
    head = runner.adapter.head()
    h = torch.randn(3, H, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for drafter in (d, q):
            drafter.begin(runner, PROMPTS)
        if kind == "medusa":
            ref, got = (x.head_logits(head, h, draft=True) for x in (d, q))
        else:
            s = torch.randn(3, d.embed_dim, generator=torch.Generator().manual_seed(1))
            ref, got = (x.logits(head, h, s, draft=True) for x in (d, q))
    assert isinstance(q._sub_head, RTNLinear) and got.shape == ref.shape
    assert 0 < float((got - ref).abs().max()) <= 0.02 * float(ref.abs().max())
    for prompts in (PROMPTS[:1], PROMPTS):
        assert D.generate(model, None, prompts, 10, drafter=q, eos_token_id=None).sequences == \
            hf_greedy(model, prompts, 10)
    cut = q._sub_head
    D.generate(model, None, PROMPTS[:1], 4, drafter=q, eos_token_id=None)
    assert q._sub_head is cut  # not cut and quantized again per generation
    with torch.no_grad():
        head.weight.mul_(1.0)  # an in-place change of the head (same values): cut again
    D.generate(model, None, PROMPTS[:1], 4, drafter=q, eos_token_id=None)
    assert q._sub_head is not cut
    with pytest.raises(ConfigError, match="save it before quantizing"):
        q.save("/nonexistent")
    with pytest.raises(ConfigError, match="already quantized"):
        q.quantize()
    with pytest.raises(ConfigError, match="group_size"):
        copy.deepcopy(d).quantize(8, 7)
    with pytest.raises(ConfigError, match="bits"):
        copy.deepcopy(d).quantize(5)


def test_drafters_that_cannot_be_quantized_say_so(tiny):
    model, _ = tiny
    drafters = random_drafters(model)
    with pytest.raises(ConfigError, match="no nn.Linear"):
        drafters["hidden_transfer"].quantize()
    with pytest.raises(ConfigError, match="compress that model"):
        drafters["draft_model"].quantize()


def test_typical_acceptance_takes_the_longest_plausible_path():
    tree = D.TokenTree([0, 1, 2, 3], [-1, 0, 0, 2])
    probs = torch.full((4, 4), 0.01)
    probs[0] = torch.tensor([0.02, 0.48, 0.48, 0.02])  # both children plausible
    probs[2] = torch.tensor([0.01, 0.01, 0.01, 0.97])  # node 3 confident
    probs[1] = probs[3] = torch.tensor([0.97, 0.01, 0.01, 0.01])
    g = torch.Generator().manual_seed(0)
    path, nxt = D.accept_typical(tree, probs, g)
    assert path == [0, 2, 3] and nxt == 0
    probs[2] = torch.tensor([0.9, 0.03, 0.02, 0.05])  # token 3 now below min(0.09, 0.3 exp(-H)) = 0.09
    path, _ = D.accept_typical(tree, probs, g)
    assert path == [0, 1]  # depth 1 is the longest; ties go to the first candidate


def test_sampling_with_medusa_uses_typical_acceptance_and_refuses_rejection(tiny):
    model, _ = tiny
    med = random_drafters(model)["medusa"]
    out = D.generate(model, None, PROMPTS, 8, drafter=med, temperature=0.8, seed=3)
    assert [len(s) for s in out.sequences] == [8, 8, 8]
    again = D.generate(model, None, PROMPTS, 8, drafter=med, temperature=0.8, seed=3)
    assert again.sequences == out.sequences  # seeded
    with pytest.raises(ConfigError, match="typical"):
        D.generate(model, None, PROMPTS, 8, drafter=med, temperature=0.8, acceptance="rejection")


# --- training, saving, errors ----------------------------------------------------------------------
def test_self_distillation_data_is_the_models_own_greedy_continuation_and_cached(tiny, tmp_path):
    model, tok = tiny
    data = D.self_distill_data(model, tok, n=4, prompt_len=6, new_tokens=10, cache_dir=tmp_path)
    assert data.tokens.shape == (4, 16)
    prompts = data.tokens[:, :6].tolist()
    assert data.tokens[:, 6:].tolist() == hf_greedy(model, prompts, 10)
    assert len(list(tmp_path.glob("selfdistill-*.safetensors"))) == 1
    again = D.self_distill_data(model, tok, n=4, prompt_len=6, new_tokens=10, cache_dir=tmp_path)
    assert torch.equal(again.tokens, data.tokens)


@pytest.mark.parametrize("kind", ["medusa", "redrafter", "hidden_transfer"])
def test_training_lowers_the_loss_saves_loads_and_resumes(tiny, tmp_path, kind):
    model, tok = tiny
    data = D.self_distill_data(model, tok, n=6, prompt_len=6, new_tokens=16)
    make = {"medusa": lambda: D.MedusaHeads.for_model(model, 2, tree=6, topk=3),
            "redrafter": lambda: D.ReDrafter.for_model(model, beam_width=2, beam_length=2),
            "hidden_transfer": lambda: D.HiddenTransfer.for_model(model, n_future=2, tree=6, topk=3)}[kind]
    opts = {"steps": 24, "lr": 1e-2, "batch": 2, "anchors_per_seq": 4, "progress": False}
    torch.manual_seed(0)
    full = make()

    def loss_on_all(drafter, soft) -> float:  # every row and anchor, deterministic
        ahead = D.train._ahead(drafter)
        hidden = None if kind == "hidden_transfer" else D.train.final_hidden(model, data.tokens)
        with torch.no_grad():
            at = torch.tensor(list(data.anchors(ahead)))
            return D.train._loss(drafter, model, data.tokens, hidden, at, soft).item()

    before = loss_on_all(full, False)
    D.train_drafter(full, model, data, soft=False, **opts)
    assert loss_on_all(full, False) < before - 0.05  # on the model's tokens
    torch.manual_seed(0)
    full = make()
    before = loss_on_all(full, True)
    D.train_drafter(full, model, data, **opts)
    # on the model's distributions (soft, the default): the floor is the model's entropy, near
    # log(vocab) for a random tiny model, so the drop is small but must be there
    assert loss_on_all(full, True) < before - 1e-3
    # interrupted after a checkpoint, resumed: the same result
    torch.manual_seed(0)
    cut = make()
    calls = {"n": 0}
    real = D.train._loss

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt
        return real(*a, **k)

    D.train._loss = failing
    try:
        with pytest.raises(KeyboardInterrupt):
            D.train_drafter(cut, model, data, checkpoint_dir=tmp_path / "ck", checkpoint_every=6, **opts)
    finally:
        D.train._loss = real
    torch.manual_seed(0)
    resumed = make()
    rep2 = D.train_drafter(resumed, model, data, checkpoint_dir=tmp_path / "ck", checkpoint_every=6, **opts)
    assert rep2.resumed_at == 12
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # saved and loaded with the model's folder; the loaded drafter decodes identically
    full.save(tmp_path / "model")
    loaded = D.load_drafter(tmp_path / "model")
    assert type(loaded) is type(full)
    a = D.generate(model, None, PROMPTS, 10, drafter=full)
    b = D.generate(model, None, PROMPTS, 10, drafter=loaded)
    assert a.sequences == b.sequences and a.stats.tokens_per_step == b.stats.tokens_per_step


def test_final_hidden_is_what_the_head_sees_without_computing_logits(tiny):
    """``final_hidden`` (the training's cached hidden states) stops each forward at the LM head: it
    returns the final-normed states the model's own output reports, batch by batch, and the head
    never runs."""
    model, _ = tiny
    tokens = torch.randint(0, model.config.vocab_size, (5, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=tokens, output_hidden_states=True).hidden_states[-1]
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    try:
        got = D.train.final_hidden(model, tokens, batch=2)  # batches of 2, 2 and 1
    finally:
        hook.remove()
    assert got.shape == want.shape and not calls
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["medusa", "redrafter"])
def test_training_over_the_drafting_vocabulary(tiny, kind):
    """draft_vocab=True: the drafter's logits and the model's distribution cover the subset only.
    With the whole vocabulary as the subset (permuted) the loss is the full-vocabulary loss; on a
    real subset it is the cross-entropy against the model's distribution renormalized over it (soft)
    or against the in-subset tokens only (hard); training lowers it."""
    model, tok = tiny
    V = model.config.vocab_size
    data = D.self_distill_data(model, tok, n=6, prompt_len=6, new_tokens=16)
    make = {"medusa": lambda: D.MedusaHeads.for_model(model, 2, tree=6, topk=3),
            "redrafter": lambda: D.ReDrafter.for_model(model, beam_width=2, beam_length=2)}[kind]
    torch.manual_seed(0)
    d = make()
    hidden = D.train.final_hidden(model, data.tokens)
    at = torch.tensor(list(data.anchors(D.train._ahead(d))))

    def loss(soft, draft_vocab):
        with torch.no_grad():
            return D.train._loss(d, model, data.tokens, hidden, at, soft, draft_vocab).item()

    full = {soft: loss(soft, False) for soft in (True, False)}
    d.set_draft_vocab(torch.randperm(V, generator=torch.Generator().manual_seed(3)))
    for soft in (True, False):
        assert loss(soft, True) == pytest.approx(full[soft], rel=1e-5)
    # a real subset: the most frequent three quarters of the tokens the data has, recomputed by hand
    ids = D.frequent_tokens(data.tokens, V, V)[: data.tokens.unique().numel() * 3 // 4]
    d.set_draft_vocab(ids)
    head = model.get_output_embeddings()
    k = 2 if kind == "redrafter" else d.n_heads
    idx = at[:, None] + 2 + torch.arange(k)[None, :]  # the predicted positions
    with torch.no_grad():
        if kind == "redrafter":
            inputs = data.tokens[:, (at[:, None] + 1 + torch.arange(k)[None, :])].flatten(0, 1)
            logits = d.future_logits(head, model.get_input_embeddings(), hidden[:, at].flatten(0, 1), inputs)
        else:
            logits = d.future_logits(head, hidden[:, at].flatten(0, 1))
        sub = logits[..., ids]  # the drafter over the subset
        teacher = torch.softmax(head(hidden[:, idx - 1].flatten(0, 1))[..., ids], dim=-1)
        soft_ce = -(teacher * torch.log_softmax(sub, -1)).sum(-1)  # (N, k)
        target = data.tokens[:, idx].flatten(0, 1)
        pos = torch.full((V,), -1)
        pos[ids] = torch.arange(len(ids))
        keep = pos[target] >= 0
        assert 0 < int(keep.sum()) < keep.numel()  # some targets fall outside the subset
        hard_ce = -torch.log_softmax(sub, -1).gather(-1, pos[target].clamp(min=0)[..., None])[..., 0]
    if kind == "medusa":  # Medusa's 0.8^k weighting of the heads
        w = 0.8 ** torch.arange(k, dtype=torch.float32)
        want_soft = float((soft_ce.mean(0) * w).sum())
        want_hard = float(sum(w[j] * hard_ce[keep[:, j], j].mean() for j in range(k)))
    else:
        want_soft, want_hard = float(soft_ce.mean()), float(hard_ce[keep].mean())
    assert loss(True, True) == pytest.approx(want_soft, rel=1e-4)
    assert loss(False, True) == pytest.approx(want_hard, rel=1e-4)
    before = loss(True, True)
    D.train_drafter(d, model, data, steps=24, lr=1e-2, batch=2, anchors_per_seq=4, draft_vocab=True, progress=False)
    assert loss(True, True) < before - 1e-3
    out = D.generate(model, None, PROMPTS, 10, drafter=d)  # still lossless
    assert out.sequences == D.generate(model, None, PROMPTS, 10).sequences


def test_training_over_the_drafting_vocabulary_needs_one(tiny):
    model, tok = tiny
    data = D.self_distill_data(model, tok, n=4, prompt_len=6, new_tokens=12)
    with pytest.raises(ConfigError, match="set_draft_vocab"):
        D.train_drafter(D.ReDrafter.for_model(model), model, data, steps=1, draft_vocab=True, progress=False)
    with pytest.raises(ConfigError, match="set_draft_vocab"):
        D.train_drafter(D.HiddenTransfer.for_model(model, n_future=2), model, data, steps=1, draft_vocab=True,
                        progress=False)


def test_medusa_runs_only_the_heads_its_tree_reaches(tiny):
    """A tree two levels deep drafts with heads 1-2 only, and proposes what all four heads would."""
    model, _ = tiny
    med = D.MedusaHeads.for_model(model, 4, tree=[(0,), (1,), (0, 0), (0, 1)], topk=3)
    for p in med.parameters():
        torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(0))
    ran = []
    for k, head in enumerate(med.heads):
        head.register_forward_hook(lambda *_a, k=k: ran.append(k))
    out = D.generate(model, None, PROMPTS, 6, drafter=med)
    assert ran and set(ran) == {0, 1}
    h = torch.randn(2, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = med.head_logits(model.get_output_embeddings(), h)  # every head
    med.begin(Runner(model, 2), None)
    trees = med.propose([0, 1], [5, 7], h)
    top = full.topk(3, dim=-1).indices
    for b, tree in enumerate(trees):
        assert tree.tokens == [[5, 7][b], *(int(top[b, len(c) - 1, c[-1]]) for c in med.choices())]
    assert out.sequences == D.generate(model, None, PROMPTS, 6).sequences
    med.set_tree([])  # no candidates: the root is verified alone, no head runs
    ran.clear()
    assert [t.tokens for t in med.propose([0, 1], [5, 7], h)] == [[5], [7]] and not ran


def test_measured_accuracy_builds_the_tree(tiny):
    model, tok = tiny
    data = D.self_distill_data(model, tok, n=4, prompt_len=6, new_tokens=16)
    med = D.MedusaHeads.for_model(model, 2, tree=4, topk=3)
    acc = D.measure_accuracy(med, model, data)
    assert acc.shape == (2, 3) and torch.equal(med.accuracy, acc)
    assert ((acc >= 0) & (acc <= 1)).all() and (acc.sum(1) <= 1 + 1e-6).all()
    assert med.choices() == D.best_tree(acc, 4)


def test_clear_errors(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(ConfigError, match="tokenizer"):
        D.generate(model, None, ["text"], 4)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        D.generate(model, tok, ["text"], 0)
    other, _ = llmdeploy.load("tiny-opt")
    if other.get_output_embeddings().out_features != model.get_output_embeddings().out_features:
        with pytest.raises(ConfigError, match="vocabulary"):
            D.generate(model, None, PROMPTS, 4, drafter=D.DraftModel(other))
    with pytest.raises(CheckpointError, match="no drafter"):
        D.load_drafter(tmp_path)
    with pytest.raises(ConfigError, match="llmdeploy.save"):
        D.DraftModel(model).save(tmp_path)
    with pytest.raises(ConfigError):
        D.TokenTree([1, 2], [-1, 1])  # a node cannot be its own parent


def test_cli_trains_and_benchmarks_a_drafter(tmp_path, capsys):
    from llmdeploy.cli.main import main

    out = tmp_path / "medusa"
    assert main(["drafter", "train", "tiny-llama", "--kind", "medusa", "-o", str(out), "--prompts", "4",
                 "--prompt-len", "6", "--new-tokens", "16", "--heads", "2", "--steps", "4", "--tree", "4"]) == 0
    assert (out / "drafter.json").exists() and isinstance(D.load_drafter(out), D.MedusaHeads)
    assert main(["drafter", "bench", "tiny-llama", "--drafter", str(out), "--prompts", "2", "--prompt-len", "8",
                 "--new-tokens", "8", "--batch", "2"]) == 0
    text = capsys.readouterr().out
    assert "plain:" in text and "output = plain greedy" in text
    assert main(["drafter", "bench", "tiny-llama", "--drafter", str(tmp_path / "none")]) == 2  # one-line error


# --- continuous batching -------------------------------------------------------------------------
def _run_engine(engine, prompts, temperatures=None):
    ids = []
    for i, p in enumerate(prompts):  # staggered arrivals: requests join while others decode
        t = temperatures[i] if temperatures else 0.0
        ids.append(engine.add_request(p, 12 + i, temperature=t, seed=i))
        engine.step()
    res = engine.run()
    return [res[i] for i in ids]


@pytest.mark.parametrize("blocks", [64, 12])  # 12 blocks of 4: requests get preempted and recomputed
def test_speculative_engine_keeps_greedy_output_under_continuous_batching(tiny, blocks):
    from llmdeploy.kv import PagedEngine, PagedKVCache

    model, _ = tiny
    prompts = PROMPTS + [[7] * 20, [100, 101]]
    ref = _run_engine(PagedEngine(model, PagedKVCache(64, 4)), prompts)
    for name, drafter in random_drafters(model).items():
        if name == "draft_model":
            with pytest.raises(ConfigError, match="continuous"):
                D.SpeculativeEngine(model, PagedKVCache(blocks, 4), drafter)
            continue
        cache = PagedKVCache(blocks, 4)
        engine = D.SpeculativeEngine(model, cache, drafter)
        assert _run_engine(engine, prompts) == ref, name
        assert engine.spec_draft_tokens > 0
        assert cache.num_free_blocks == blocks  # every block back, rejected drafts included
        if blocks == 12:
            assert engine.preemptions > 0


def test_speculative_engine_serves_sampled_requests_beside_greedy_ones(tiny):
    from llmdeploy.kv import PagedEngine, PagedKVCache

    model, _ = tiny
    temps = [0.0, 0.9, 0.0]
    ref = _run_engine(PagedEngine(model, PagedKVCache(64, 4)), PROMPTS, temps)
    got = _run_engine(D.SpeculativeEngine(model, PagedKVCache(64, 4), random_drafters(model)["medusa"]), PROMPTS, temps)
    assert got[0] == ref[0] and got[2] == ref[2]  # greedy rows unchanged
    assert got[1] == ref[1]  # the sampled row decodes one token per step from its own seeded generator


def test_paged_cache_truncation_frees_blocks_and_refuses_where_it_cannot():
    from llmdeploy.kv import KVQuantConfig, PagedKVCache

    cache = PagedKVCache(8, 4)
    cache.add("a")
    cache.prepare(["a"], [10])
    assert cache.num_free_blocks == 5
    cache.truncate("a", 5)
    assert cache.length("a") == 5 and cache.num_free_blocks == 6
    with pytest.raises(ConfigError):
        cache.truncate("a", 6)
    per_channel = PagedKVCache(8, 4, quant=KVQuantConfig(bits=8, key_axis="channel"))
    per_channel.add("a")
    with pytest.raises(ConfigError, match="per channel"):
        per_channel.truncate("a", 0)


def test_readme_quotes_the_decode_benchmark():
    """The README's decoding numbers are benchmarks/results/decode/decode.json's, and every swept
    configuration decoded exactly what plain greedy decoding does."""
    import json
    from pathlib import Path

    from benchmarks.decode import readme_paragraph

    root = Path(__file__).resolve().parent.parent
    res = json.loads((root / "benchmarks/results/decode/decode.json").read_text())
    readme = " ".join((root / "README.md").read_text().split())
    assert " ".join(readme_paragraph(res).split()) in readme
    assert res["sweep"] and all(r["identical_to_greedy"] for r in res["sweep"].values())
    sw = res["sweep"]
    ht, rd, md = sw["hidden_transfer 32"], sw["redrafter (16, 3)"], sw["medusa 32"]
    assert (f"hidden transfer {ht['tokens_per_step']:.2f} tokens per step with {ht['tree']:.0f} candidates, "
            f"ReDrafter {rd['tokens_per_step']:.2f} with {rd['tree']:.0f}, Medusa {md['tokens_per_step']:.2f} with "
            f"{md['tree']:.0f}") in readme
    rows = res["timing"]["rows"]
    baselines = [k for k in rows if k.startswith(("plain", "hf generate"))]
    plain = max(rows[k]["tok_s_b1"] for k in baselines)
    if "no drafter trained here beats plain decoding" in readme:
        assert all(r["tok_s_b1"] < plain for k, r in rows.items() if k not in baselines)
    fastest = max((k for k in rows if k not in baselines), key=lambda k: rows[k]["tok_s_b1"])
    assert f"{rows[fastest]['tok_s_b1'] / rows['plain']['tok_s_b1']:.2f}x plain decoding at batch 1" in readme
    for timing in (res["timing"], res.get("timing_earlier")):  # Medusa's sentence: its latest timing run
        fr = [k for k in (timing or {}).get("rows", {})
              if k.startswith("medusa fr8k") and not k.endswith("BLAS linears")]
        if fr:
            t = timing["rows"]
            m = t[fr[0]]["tok_s_b1"]
            assert f"Medusa with a {fr[0].split()[-1]}-node tree" in readme
            assert (f"{m / t['plain']['tok_s_b1']:.2f}x plain decoding at batch 1 "
                    f"({m / t['hf generate']['tok_s_b1']:.2f}x transformers' generate)") in readme
            break


def test_decode_benchmark_redoes_the_sweep_of_a_retrained_drafter_and_keeps_what_was_timed():
    """A drafter trained anew loses its sweep rows (they are redone); the rows the timing table
    used move to ``sweep_timed``, which the README sentence quotes until the next timing run."""
    from benchmarks.decode import _retire_sweep, markdown, readme_paragraph

    def row(method, cfg, tps):
        return {"method": method, "config": cfg, "tokens_per_step": tps, "tree": 2.0, "positions": 3.0,
                "identical_to_greedy": True, "generate_seconds": 1.0}

    timing = {"tok_s_b1": 10.0, "tok_s_b4": 20.0}
    res = {"meta": {"new_tokens": 64},
           "train": {"redrafter": {"steps": 4000, "parameters": 1, "loss_first": 2.0, "loss_last": 1.0, "seconds": 1.0}},
           "sweep": {"medusa 2": row("medusa", 2, 1.5), "redrafter (1, 2)": row("redrafter", [1, 2], 1.4),
                     "redrafter (4, 2)": row("redrafter", [4, 2], 1.6),
                     "redrafter-fr8k (2, 2)": row("redrafter-fr8k", [2, 2], 1.9)},
           "timing": {"repeats": 3, "rows": {"hf generate": timing, "plain": timing, "medusa 2": timing,
                                             "redrafter (1, 2)": timing},
                      "trained_steps": {"medusa": 4000, "redrafter": 1000}}}
    _retire_sweep(res, "redrafter")  # another trained drafter of the family keeps its rows
    assert set(res["sweep"]) == {"medusa 2", "redrafter-fr8k (2, 2)"}
    assert set(res["sweep_timed"]) == {"redrafter (1, 2)"}
    assert "redrafter (1 beams x 2): 1.40 tokens per step" in readme_paragraph(res)
    text = markdown(res)
    assert "The redrafter rows were timed with its 1000-step training" in text
    assert "retrained since" in text


def test_decode_benchmark_keeps_the_timing_it_replaces():
    """Re-timing the same methods appends the replaced table to ``timing_history`` (shown in
    DECODE.md); a run of fewer methods keeps the others' last table under ``timing_earlier``; and
    every earlier run the README quotes is in decode.json."""
    import json
    from pathlib import Path

    from benchmarks.decode import _replace_timing, markdown

    def timing(methods, rate, date):
        r = {"tok_s_b1": rate, "tok_s_b4": rate}
        return {"repeats": 3, "methods": methods, "date": date, "trained_steps": {},
                "rows": {"hf generate": {"tok_s_b1": 10.0, "tok_s_b4": 10.0}, "plain": {"tok_s_b1": 10.0, "tok_s_b4": 10.0},
                         f"{methods[0]} 2": r}}

    res = {"timing": timing(["medusa", "redrafter"], 12.0, "d1")}
    _replace_timing(res, timing(["redrafter"], 13.0, "d2"))
    assert res["timing_earlier"]["date"] == "d1" and "timing_history" not in res
    _replace_timing(res, timing(["redrafter"], 14.0, "d3"))
    assert [t["date"] for t in res["timing_history"]] == ["d2"] and res["timing_earlier"]["date"] == "d1"
    _replace_timing(res, timing(["medusa", "redrafter"], 15.0, "d4"))
    assert [t["date"] for t in res["timing_history"]] == ["d2", "d3"] and "timing_earlier" not in res
    res.update({"meta": {"new_tokens": 64}, "sweep": {}})
    text = markdown(res)
    assert "earlier run of the same methods, d3" in text and "1.40x" in text  # d3's 14 against 10

    root = Path(__file__).resolve().parent.parent
    res = json.loads((root / "benchmarks/results/decode/decode.json").read_text())
    readme = " ".join((root / "README.md").read_text().split())
    quoted = {(k, f"{r['tok_s_b1'] / max(v['tok_s_b1'] for n, v in t['rows'].items() if n.startswith(('plain', 'hf'))):.2f}x")
              for t in res.get("timing_history", []) for k, r in t["rows"].items()
              if k.startswith("redrafter fr8k (") and not k.endswith("BLAS linears")}
    assert quoted and all(x in readme for _, x in quoted)


def test_decode_benchmark_rotates_the_decoders_per_prompt_group():
    """The timing interleaves per prompt group: every group runs each decoder once, and over as many
    consecutive groups as there are decoders each decoder takes every place in the order once (so
    none always runs right after another, or in the same part of a slow minute)."""
    from benchmarks.decode import rotations

    keys = ["hf generate", "plain", "a", "b", "c"]
    orders = rotations(keys, 12, start=3)
    assert len(orders) == 12 and all(sorted(o) == sorted(keys) for o in orders)
    for window in (orders[:5], orders[4:9]):
        for place in range(len(keys)):
            assert sorted(o[place] for o in window) == sorted(keys)
    assert orders[0][0] == "b" and rotations(keys, 2, start=5) == rotations(keys, 2)  # start wraps
