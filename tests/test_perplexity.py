import math

import torch

import llmdeploy
from llmdeploy.data import load_text


def _independent_ppl(model, tok, text, seq_len, max_windows=None):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    nlls = []
    n = len(ids) // seq_len if max_windows is None else min(len(ids) // seq_len, max_windows)
    for w in range(n):
        window = torch.tensor(ids[w * seq_len : (w + 1) * seq_len])[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(window).logits[0].double(), -1)
        nlls.extend((-logp[:-1].gather(1, window[0, 1:, None])).flatten().tolist())
    return math.exp(sum(nlls) / len(nlls)), len(nlls)


def test_perplexity_equals_independent_computation(text_corpus):
    model, tok = llmdeploy.load("tiny-llama")
    r = llmdeploy.eval.perplexity(model, tok, corpus=text_corpus, seq_len=64, batch_size=3)
    ppl, n = _independent_ppl(model, tok, load_text(text_corpus, "test"), 64)
    assert n > 500
    assert r.n_tokens == n and r.n_windows == n // 63
    assert math.isclose(r.ppl, ppl, rel_tol=1e-5)
    assert r.seconds > 0


def test_perplexity_max_windows_and_shakespeare():
    model, tok = llmdeploy.load("tiny-opt")
    r = llmdeploy.eval.perplexity(model, tok, corpus="shakespeare", seq_len=32, max_windows=5)
    ppl, n = _independent_ppl(model, tok, load_text("shakespeare", "test"), 32, max_windows=5)
    assert r.n_windows == 5 and r.n_tokens == n == 5 * 31
    assert math.isclose(r.ppl, ppl, rel_tol=1e-5)


def test_c4_follows_the_gptq_protocol(monkeypatch):
    """c4's test text is the first 1100 validation documents joined with a space, and perplexity
    scores its first 256 windows (GPTQ's valenc[:, :256 * seqlen])."""
    import datasets

    from llmdeploy.data import corpora

    docs = [f"Document {i} says hello to the world number {i}." for i in range(1500)]
    calls = []

    def fake_load_dataset(name, data_files=None, split=None, **kw):
        calls.append((name, data_files, split))
        return {"text": docs}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(corpora, "_hub_reachable", lambda host="huggingface.co": True)
    text = load_text("c4", "test")
    assert text == " ".join(docs[:1100])
    assert calls[-1] == ("allenai/c4", {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "validation")
    model, tok = llmdeploy.load("tiny-llama")
    windows = llmdeploy.eval.test_windows(tok, "c4", seq_len=16, max_windows=None)
    assert len(tok(text)["input_ids"]) // 16 > 256 and windows.shape == (256, 16)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert windows.flatten().tolist() == ids[: 256 * 16]  # the first 256 × seq_len tokens


def test_seq_len_defaults_agree():
    """perplexity, evaluate and the CLI use the protocol's 2048 by default."""
    import inspect

    from llmdeploy.cli.main import build_parser

    assert inspect.signature(llmdeploy.eval.perplexity).parameters["seq_len"].default == 2048
    assert inspect.signature(llmdeploy.eval.evaluate).parameters["seq_len"].default == 2048
    assert build_parser().parse_args(["eval", "m"]).seq_len == 2048
