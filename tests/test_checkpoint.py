import json
import os

import pytest
import torch

import llmdeploy
from llmdeploy import Compose
from llmdeploy.errors import CheckpointError
from llmdeploy.io import checkpoint
from llmdeploy.quant import RTN, DynamicInt8, DynamicInt8Linear, RTNLinear

from .conftest import FAMILIES, ids_for

COMPRESSORS = {
    "dense": None,
    "rtn2": RTN(bits=2, group_size=32),
    "rtn3": RTN(bits=3, group_size=32),
    "rtn4-sym": RTN(bits=4, group_size=32, symmetric=True),
    "rtn8-perchannel": RTN(bits=8, group_size=-1),
    "mixed": RTN(bits=4, group_size=32, overrides={"down_proj|fc2": 8}),
    "w8a8": DynamicInt8(),
    "compose": Compose([RTN(bits=3, group_size=32, overrides={"down_proj|fc2": None}), DynamicInt8()]),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which", list(COMPRESSORS))
def test_round_trip_identical_logits(family, which, tmp_path):
    model, tok = llmdeploy.load(family)
    comp = COMPRESSORS[which]
    if comp is not None:
        model = comp(model)
    ids = ids_for(tok)
    with torch.no_grad():
        ref = model(ids).logits
    out = llmdeploy.save(model, tok, tmp_path / "saved")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no temp folder left
    loaded, tok2 = llmdeploy.load(out)
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.equal(got, ref)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    assert llmdeploy.applied_recipe(loaded) == llmdeploy.applied_recipe(model)
    assert tok2("hello")["input_ids"] == tok("hello")["input_ids"]
    if which == "compose":
        assert isinstance(loaded.get_submodule(llmdeploy.get_adapter(loaded).linear_names()[0]), RTNLinear)
        assert any(isinstance(m, DynamicInt8Linear) for m in loaded.modules())


@pytest.fixture
def saved(tmp_path):
    model, tok = llmdeploy.load("tiny-llama")
    RTN(bits=4, group_size=32)(model)
    return llmdeploy.save(model, tok, tmp_path / "saved")


def test_truncated_weights_are_reported(saved):
    w = saved / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="sha256"):
        llmdeploy.load(saved)
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load_saved(saved, verify=False)


def test_missing_weights_are_reported(saved):
    os.remove(saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        llmdeploy.load(saved)


def test_corrupt_manifest_is_reported(saved):
    (saved / "llmdeploy.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        llmdeploy.load(saved)
    (saved / "llmdeploy.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not an llmdeploy manifest"):
        llmdeploy.load(saved)


def test_unknown_module_class_is_reported(saved):
    m = json.loads((saved / "llmdeploy.json").read_text())
    first = next(iter(m["modules"]))
    m["modules"][first]["class"] = "EvilLinear"
    (saved / "llmdeploy.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="EvilLinear"):
        llmdeploy.load(saved)


def test_mismatched_shapes_are_reported(saved):
    m = json.loads((saved / "llmdeploy.json").read_text())
    first = next(iter(m["modules"]))
    m["modules"][first]["init"]["bits"] = 3  # packed shape no longer matches
    (saved / "llmdeploy.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError):
        llmdeploy.load(saved)


def test_save_is_atomic(tmp_path, monkeypatch):
    model, tok = llmdeploy.load("tiny-llama")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_model", boom)
    with pytest.raises(KeyboardInterrupt):
        llmdeploy.save(model, tok, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_previous_save(saved, monkeypatch):
    before = (saved / "model.safetensors").read_bytes()
    model, tok = llmdeploy.load("tiny-llama")
    monkeypatch.setattr(checkpoint, "save_model", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        llmdeploy.save(model, tok, saved)
    assert (saved / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["saved"]


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "important.txt").write_text("keep me")
    model, tok = llmdeploy.load("tiny-llama")
    with pytest.raises(CheckpointError, match="not an earlier llmdeploy save"):
        llmdeploy.save(model, tok, tmp_path / "notes")
    assert (tmp_path / "notes" / "important.txt").read_text() == "keep me"


def test_saved_dense_directory_is_a_plain_hf_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = llmdeploy.load("tiny-qwen2")
    out = llmdeploy.save(model, tok, tmp_path / "dense")
    hf = AutoModelForCausalLM.from_pretrained(out)
    ids = ids_for(tok)
    assert torch.equal(hf(ids).logits, model(ids).logits)
