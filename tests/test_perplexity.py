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
