import pytest
import torch
from transformers import AutoModelForCausalLM

import llmdeploy
from llmdeploy.errors import ConfigError
from llmdeploy.prune import DropLayers, LaCo, ShortGPT, block_influence, rdsc_merge

from .conftest import FAMILIES, ids_for


def test_rdsc_merge_matches_hand_computation():
    model, _ = llmdeploy.load("tiny-llama")
    layers = list(model.model.layers)
    merged = rdsc_merge(layers[:3])
    for name, p in merged.named_parameters():
        w0, w1, w2 = (dict(layer.named_parameters())[name].detach() for layer in layers[:3])
        torch.testing.assert_close(p.detach(), w0 + (w1 - w0) + (w2 - w0))  # = w1 + w2 - w0
    # the originals are untouched
    assert not any(p is q for p in merged.parameters() for q in layers[0].parameters())


def test_fold_of_two_layers_keeps_the_upper_one():
    model, _ = llmdeploy.load("tiny-qwen2")
    a, b = model.model.layers[0], model.model.layers[1]
    merged = rdsc_merge([a, b])  # θ_a + (θ_b − θ_a) = θ_b
    for (n, x), (_, y) in zip(merged.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, msg=n)


def test_fold_of_one_layer_is_identity():
    model, tok = llmdeploy.load("tiny-llama")
    layer = model.model.layers[1]
    merged = rdsc_merge([layer])
    for (n, a), (_, b) in zip(layer.state_dict().items(), merged.state_dict().items()):
        assert torch.equal(a, b), n
    ids = ids_for(tok)
    ref = model(ids).logits
    LaCo(merge_layers=1, threshold=-1.0)(model, ids_for(tok, n=4, seq=32))
    assert len(model.model.layers) == 3 and torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_laco_folds_and_keeps_model_consistent(family, tmp_path):
    model, tok = llmdeploy.load(family)
    blocks = list(llmdeploy.get_adapter(model).blocks())
    linears = list(llmdeploy.get_adapter(model).block_linears(blocks[0]))
    expected = rdsc_merge(blocks[0:2], linears)  # fold layer 1 into layer 0; layer 2 moves to index 1
    calib = ids_for(tok, n=4, seq=32, seed=1)
    laco = LaCo(merge_layers=2, interval=1, threshold=-1.0, lowest=0, highest=2, target_layers=2)
    laco(model, calib)
    new_blocks = llmdeploy.get_adapter(model).blocks()
    assert len(new_blocks) == 2 == model.config.num_hidden_layers
    assert laco.report_.merges[0]["into"] == 0 and laco.report_.removed == [1]
    assert new_blocks[1] is blocks[2]
    for (n, a), (_, b) in zip(new_blocks[0].state_dict().items(), expected.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    for key in ("layer_types",):
        if hasattr(model.config, key) and model.config.layer_types is not None:
            assert len(model.config.layer_types) == 2
    _check_generation_and_export(model, tok, tmp_path)


def _check_generation_and_export(model, tok, tmp_path):
    prompt = ids_for(tok, n=2, seq=12, seed=5)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    for i, block in enumerate(llmdeploy.get_adapter(model).blocks()):
        assert all(m.layer_idx == i for m in block.modules() if hasattr(m, "layer_idx"))
    with_cache = model.generate(prompt, use_cache=True, **kw)
    without = model.generate(prompt, use_cache=False, **kw)
    static = model.generate(prompt, use_cache=True, cache_implementation="static", **kw)
    assert torch.equal(with_cache, without) and torch.equal(static, without)
    out = llmdeploy.save(model, tok, tmp_path / "pruned")
    plain = AutoModelForCausalLM.from_pretrained(out)  # no llmdeploy involved
    ids = ids_for(tok)
    assert torch.equal(plain(ids).logits, model(ids).logits)
    again, _ = llmdeploy.load(out)
    assert torch.equal(again(ids).logits, model(ids).logits)


def test_shortgpt_removes_lowest_block_influence(tmp_path):
    model, tok = llmdeploy.load("tiny-qwen2")
    calib = ids_for(tok, n=4, seq=32, seed=2)
    scores = block_influence(model, calib)
    # Independent computation with hooks on a plain forward pass.
    ref, _ = llmdeploy.load("tiny-qwen2")
    pairs = []
    hooks = [b.register_forward_hook(lambda m, a, k, o: pairs.append((k.get("hidden_states", a[0] if a else None), o)),
                                     with_kwargs=True) for b in ref.model.layers]
    with torch.no_grad():
        ref(calib)
    for h in hooks:
        h.remove()
    for i, (x, y) in enumerate(pairs):
        y = y[0] if isinstance(y, tuple) else y
        bi = 1 - torch.nn.functional.cosine_similarity(x, y, dim=-1).mean().item()
        assert bi == pytest.approx(scores[i], abs=1e-5)
    sg = ShortGPT(n_remove=1)
    sg(model, calib)
    assert sg.report_.removed == [min(range(3), key=lambda i: scores[i])]
    assert len(model.model.layers) == 2 and model.model.layers[1].self_attn.layer_idx == 1
    _check_generation_and_export(model, tok, tmp_path)


def test_drop_layers_and_errors(tmp_path):
    model, tok = llmdeploy.load("tiny-opt")
    keep = model.model.decoder.layers[2]
    DropLayers(layers=[0, 1])(model)
    assert list(model.model.decoder.layers) == [keep] and model.config.num_hidden_layers == 1
    _check_generation_and_export(model, tok, tmp_path)
    with pytest.raises(ConfigError):
        DropLayers(layers=[0])(model)  # the last layer must stay
    m2, _ = llmdeploy.load("tiny-llama")
    with pytest.raises(ConfigError):
        ShortGPT(n_remove=3)(m2, ids_for(tok))
    with pytest.raises(ConfigError):
        LaCo(lowest=2, highest=1)(m2, ids_for(tok))


def test_laco_guard_rejects_and_leaves_the_model_unchanged():
    """A threshold no fold can reach: every trial is rejected and the model is exactly the same."""
    model, tok = llmdeploy.load("tiny-llama")
    ids = ids_for(tok)
    with torch.no_grad():
        ref = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    laco = LaCo(merge_layers=2, interval=1, threshold=1.01, lowest=0)
    laco(model, ids_for(tok, n=4, seq=32))
    assert laco.report_.trials and not any(t["accepted"] for t in laco.report_.trials)
    assert laco.report_.removed == [] and model.config.num_hidden_layers == 3
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_laco_guard_accepts_between_the_measured_similarities():
    """Thresholds just below and above the measured similarity of the first trial accept and
    reject that same fold: the guard compares the right number."""
    model, tok = llmdeploy.load("tiny-qwen2")
    calib = ids_for(tok, n=4, seq=32)
    probe = LaCo(merge_layers=2, interval=1, threshold=1.01, lowest=0)
    probe(llmdeploy.load("tiny-qwen2")[0], calib)
    (first,) = probe.report_.trials  # 3 layers, C = 2: one trial, folding layer 1 into 0
    assert (first["into"], first["folded"]) == (0, [1]) and -1 <= first["similarity"] <= 1
    below = LaCo(merge_layers=2, interval=1, threshold=first["similarity"] - 1e-6, lowest=0)
    below(model, calib)
    assert below.report_.merges[0]["into"] == 0 and model.config.num_hidden_layers == 2
    assert below.report_.merges[0]["similarity"] == pytest.approx(first["similarity"], abs=1e-6)
    above = LaCo(merge_layers=2, interval=1, threshold=first["similarity"] + 1e-6, lowest=0)
    above(llmdeploy.load("tiny-qwen2")[0], calib)
    assert above.report_.merges == []


def test_laco_first_trial_starts_below_the_top_layer_and_merges_only_linears():
    """As the paper's algorithm and the notebook: the first trial folds l+1..l+C-1 into l = H - C,
    so the top layer is never folded; norms stay those of layer l unless merge_norms=True."""
    model, tok = llmdeploy.load("tiny-llama")
    blocks = list(model.model.layers)
    laco = LaCo(merge_layers=2, interval=1, threshold=-1.0, lowest=0, target_layers=2)
    laco(model, ids_for(tok, n=4, seq=32))
    assert laco.report_.trials[0]["into"] == 0 and laco.report_.trials[0]["folded"] == [1]
    merged = model.model.layers[0]
    assert torch.equal(merged.input_layernorm.weight, blocks[0].input_layernorm.weight)
    torch.testing.assert_close(merged.mlp.up_proj.weight, blocks[1].mlp.up_proj.weight)  # C = 2: θ_l+1
    with_norms = rdsc_merge(blocks[:2])
    torch.testing.assert_close(with_norms.input_layernorm.weight, blocks[1].input_layernorm.weight)


def test_laco_similarity_measures():
    from llmdeploy.prune.laco import representation_similarity

    a = torch.randn(2, 5, 8)
    b = a.clone()
    b[0, 0] *= -1  # one token flipped
    per_token = representation_similarity(a, b, "token")
    per_sequence = representation_similarity(a, b, "sequence")
    assert per_token == pytest.approx(1 - 2 / 10, abs=1e-6)
    flat = torch.nn.functional.cosine_similarity(a[0].flatten(), b[0].flatten(), dim=0)
    assert per_sequence == pytest.approx((float(flat) + 1) / 2, abs=1e-6)
