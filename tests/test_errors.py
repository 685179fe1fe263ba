"""Bad inputs tried as a new user would: each gets one of llmdeploy's own errors, raised before
any work, with a message that says what to do."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import llmdeploy
from llmdeploy.cli.main import main
from llmdeploy.data import calibration
from llmdeploy.errors import (
    CalibrationDataError,
    CheckpointError,
    ConfigError,
    CorpusUnavailableError,
    EvaluationError,
    LLMDeployError,
    ResultsError,
    UnsupportedArchitectureError,
)
from llmdeploy.prune import SliceGPT, SparseGPT
from llmdeploy.quant import AQLM, RTN

from .conftest import ids_for


def _recipe(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,match", [
    ("- method: gptqq\n  bits: 4\n", "unknown compression method 'gptqq'; available: "),
    ("- method: rtn\n  bitz: 4\n", r"has no argument\(s\) \['bitz'\]"),
    ("- method: rtn\n  bits: four\n", r"bits='four' \(str\) is not a valid value; expected int"),
    ("- method: sparsegpt\n  sparsity: '0.5'\n", "sparsity='0.5'"),
    ("- method: rtn\n  overrides: [down_proj]\n", "overrides="),
    ("- method: slicegpt\n  round_to: 8.5\n", "round_to=8.5"),
    ("- [rtn, 4]\n", "must be a mapping with a 'method' key"),
    ("steps: {method: rtn}\n", "a recipe is a list of steps"),
    ("- method: rtn\n  bits: [4\n", "not valid YAML"),
])
def test_bad_recipes_name_the_problem(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        llmdeploy.recipe.load(_recipe(tmp_path, text))


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    path = _recipe(tmp_path, "- method: rtn\n  bits: four\n")
    assert main(["compress", "tiny-llama", "--recipe", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmdeploy: error: rtn: bits='four'") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_cli_keeps_tracebacks_of_bugs(monkeypatch):
    import sys

    cli = sys.modules["llmdeploy.cli.main"]

    def boom(_args):
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr(cli, "_cmd_info", boom)
    with pytest.raises(ZeroDivisionError):
        main(["info", "x"])


@pytest.mark.parametrize("make,match", [
    (lambda: RTN(bits=4, group_size=32), "rtn would change nothing: 21 skipped because they are already quantized"),
    (lambda: SparseGPT(sparsity=0.5), "already compressed"),
    (lambda: SliceGPT(sparsity=0.25), "before quantizing or pruning"),
    (lambda: AQLM(), "already holds compressed modules"),
])
def test_applying_a_second_compressor_where_it_cannot_work(make, match):
    model, tok = llmdeploy.load("tiny-llama")
    model = RTN(bits=4, group_size=32)(model)
    recipe_before = llmdeploy.applied_recipe(model)
    with pytest.raises(ConfigError, match=match):
        make()(model, ids_for(tok, n=4, seq=16))
    assert llmdeploy.applied_recipe(model) == recipe_before  # not recorded as applied


def test_slicing_twice_and_overrides_that_leave_nothing():
    model, tok = llmdeploy.load("tiny-llama")
    calib = ids_for(tok, n=4, seq=16)
    sliced = SliceGPT(sparsity=0.25)(model, calib)
    with pytest.raises(ConfigError, match="already sliced"):
        SliceGPT(sparsity=0.25)(sliced, calib)
    dense, _ = llmdeploy.load("tiny-llama")
    with pytest.raises(ConfigError, match="overrides keep them dense"):
        RTN(bits=4, group_size=32, overrides={".*": None})(dense)
    with pytest.raises(ConfigError, match="names no role"):
        RTN(bits=4, group_size=32, overrides={"role:mlp_down": 8})(dense)


def test_calibration_windows_longer_than_the_context():
    model, tok = llmdeploy.load("tiny-llama")  # 1024 positions
    calib = torch.randint(0, 200, (2, 1100))
    with pytest.raises(CalibrationDataError, match="longer than the model's context .1024 positions."):
        SparseGPT(sparsity=0.5)(model, calib)
    with pytest.raises(CalibrationDataError, match="outside the model's vocabulary"):
        SparseGPT(sparsity=0.5)(model, torch.full((2, 16), 5000))


def test_empty_corpus_file(tmp_path):
    _, tok = llmdeploy.load("tiny-llama")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(CorpusUnavailableError, match="is empty"):
        calibration(tok, str(empty), n_samples=2, seq_len=16, seed=0)


def test_perplexity_inputs():
    model, tok = llmdeploy.load("tiny-llama")
    with pytest.raises(EvaluationError, match="longer than the model's context"):
        llmdeploy.eval.perplexity(model, tok, "shakespeare", seq_len=2048, max_windows=1)


def test_report_of_an_empty_folder(tmp_path):
    from llmdeploy.report import build_report

    with pytest.raises(ResultsError, match="no result JSON files"):
        build_report(tmp_path)


def test_checkpoint_whose_files_were_truncated_or_edited(tmp_path):
    model, tok = llmdeploy.load("tiny-llama")
    model = RTN(bits=4, group_size=32)(model)
    good = llmdeploy.save(model, tok, tmp_path / "good")
    cases = {
        "truncated weights": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:500]),
        "manifest edited": lambda d: (d / "llmdeploy.json").write_text("{not json"),
        "config edited": lambda d: (d / "config.json").write_text('{"model_type": '),
        "module class edited": lambda d: (d / "llmdeploy.json").write_text(
            (d / "llmdeploy.json").read_text().replace('"RTNLinear"', '"GPTQLinear"')),
        "module arguments edited": lambda d: (d / "llmdeploy.json").write_text(
            (d / "llmdeploy.json").read_text().replace('"bits": 4', '"bits": "4x"')),
    }
    import shutil

    for what, edit in cases.items():
        d = tmp_path / what.replace(" ", "_")
        shutil.copytree(good, d)
        edit(d)
        with pytest.raises(CheckpointError):
            llmdeploy.load(d)


def test_directory_without_a_tokenizer(tmp_path):
    model, tok = llmdeploy.load("tiny-llama")
    llmdeploy.save(model, None, tmp_path / "notok")
    with pytest.raises(CheckpointError, match="saved without a tokenizer.*tokenizer="):
        llmdeploy.load(tmp_path / "notok")
    again, tok2 = llmdeploy.load(tmp_path / "notok", tokenizer="tiny-llama")
    assert tok2("to be").input_ids == tok("to be").input_ids
    # a plain Hugging Face directory without tokenizer files
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="no tokenizer files.*tokenizer="):
        llmdeploy.load(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "tokdir")
    _, tok3 = llmdeploy.load(tmp_path / "hf", tokenizer=tmp_path / "tokdir")
    assert tok3("to be").input_ids == tok("to be").input_ids
    with pytest.raises(CheckpointError, match="no usable tokenizer"):
        llmdeploy.load(tmp_path / "hf", tokenizer=tmp_path / "nowhere")


def test_gguf_of_an_unsupported_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match="holds a 'bert' model.*llmdeploy supports llama"):
        llmdeploy.load(path)


def test_every_error_class_is_a_library_error():
    import llmdeploy.errors as errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert len(classes) >= 10 and all(issubclass(c, LLMDeployError) for c in classes)


def test_wrong_argument_types_in_python_too():
    with pytest.raises(ConfigError, match="group_size"):
        RTN(bits=4, group_size="64")
    with pytest.raises(TypeError):  # configs are keyword-only
        RTN(4, 64)
    assert "device" not in SparseGPT(sparsity=0.5, device="cpu", batch_size=2).to_dict()
    entry = copy.deepcopy(AQLM(checkpoint_dir="/tmp/x", resume=True).to_dict())
    assert not {"checkpoint_dir", "resume", "device", "batch_size"} & set(entry)
    json.dumps(entry)
