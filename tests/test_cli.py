import json

import torch

import llmdeploy
from llmdeploy.cli.main import main

from .conftest import ids_for


def test_compress_info_eval(tmp_path, capsys, text_corpus):
    rec = tmp_path / "r.yaml"
    rec.write_text("- method: rtn\n  bits: 4\n  group_size: 32\n")
    out = tmp_path / "out"
    assert main(["compress", "tiny-llama", "--recipe", str(rec), "-o", str(out)]) == 0
    model, tok = llmdeploy.load(out)
    ref, _ = llmdeploy.load("tiny-llama")
    llmdeploy.quant.RTN(bits=4, group_size=32)(ref)
    ids = ids_for(tok)
    assert torch.equal(model(ids).logits, ref(ids).logits)

    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rtn(bits=4, group_size=32" in text and "bits/param" in text

    js = tmp_path / "r.json"
    assert main(["eval", str(out), "--ppl", text_corpus, "--seq-len", "64", "--json", str(js)]) == 0
    result = json.loads(js.read_text())
    assert result["perplexity"][text_corpus]["ppl"] > 1


def test_cli_errors_are_clear(capsys, tmp_path):
    assert main(["eval", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    assert main(["info", str(tmp_path / "junk")]) == 2
    assert "not a directory written by llmdeploy.save" in capsys.readouterr().err


def test_compress_with_a_pruning_recipe(tmp_path):
    out = tmp_path / "out"
    args = ["compress", "tiny-opt", "--recipe", "sparsegpt-2of4", "-o", str(out), "--n-samples", "4", "--seq-len", "64"]
    assert main(args) == 0
    model, tok = llmdeploy.load(out)
    lin = model.get_submodule("model.decoder.layers.0.fc1")
    assert isinstance(lin, llmdeploy.prune.SparseLinear) and lin.format == "nm"
    ref, _ = llmdeploy.load("tiny-opt")
    calib = llmdeploy.data.calibration(tok, "shakespeare", n_samples=4, seq_len=64, seed=0)
    llmdeploy.prune.SparseGPT(pattern="2:4", sparsity=None)(ref, calib)
    ids = ids_for(tok)
    assert torch.equal(model(ids).logits, ref(ids).logits)


def test_compress_with_a_slicing_recipe(tmp_path):
    out = tmp_path / "sliced"
    args = ["compress", "tiny-llama", "--recipe", "slicegpt-25-rft", "-o", str(out), "--n-samples", "4",
            "--seq-len", "32"]
    assert main(args) == 0
    model, tok = llmdeploy.load(out)
    assert type(model).__name__ == "SlicedLlamaForCausalLM"
    assert model.get_submodule("model.layers.0.self_attn.q_proj").in_features == 48
    assert [e["method"] for e in llmdeploy.applied_recipe(model)] == ["slicegpt", "lora_finetune"]
    assert (out / "modeling_slicegpt.py").exists()


def test_compress_aqlm_resumes(tmp_path):
    out = tmp_path / "aq"
    rec = tmp_path / "aqlm.yaml"
    rec.write_text("- method: aqlm\n  num_codebooks: 1\n  nbits_per_codebook: 6\n  in_group_size: 8\n"
                   "  max_iter: 1\n  steps_per_round: 5\n  finetune_epochs: 1\n")
    base = ["compress", "tiny-llama", "--recipe", str(rec), "-o", str(out), "--n-samples", "2", "--seq-len", "32"]
    assert main(base) == 0
    progress = tmp_path / "aq.progress" / "step0-aqlm" / "walk-1" / "progress-rank0.json"
    assert max(int(k) for k in json.loads(progress.read_text())["states"]) == 3  # every block finished
    first, _ = llmdeploy.load(out)
    # a second run with --resume finds every block done and rebuilds the same model
    assert main(base + ["--resume"]) == 0
    again, tok = llmdeploy.load(out)
    ids = ids_for(tok)
    assert torch.equal(first(ids).logits, again(ids).logits)
    assert llmdeploy.applied_recipe(again)[0]["method"] == "aqlm"
    assert "checkpoint_dir" not in llmdeploy.applied_recipe(again)[0]


def test_compress_with_pv_tuning_after_gptq_resumes(tmp_path):
    """The recipe's PV-Tuning distils from the model the CLI loaded (top-k cache), checkpoints
    next to the output, and a --resume run finishes with the same model."""
    out = tmp_path / "pv"
    rec = tmp_path / "pv.yaml"
    rec.write_text("- method: gptq\n  bits: 2\n  group_size: 32\n"
                   "- method: pv_tuning\n  steps: 2\n  batch_size: 2\n  teacher_top_k: 16\n  max_code_change: 0.05\n")
    base = ["compress", "tiny-llama", "--recipe", str(rec), "-o", str(out), "--n-samples", "4", "--seq-len", "32"]
    assert main(base) == 0
    progress = json.loads((tmp_path / "pv.progress" / "step1-pv_tuning" / "progress.json").read_text())
    assert progress["step"] == 2 and len(progress["history"]) == 2
    first, _ = llmdeploy.load(out)
    assert main(base + ["--resume"]) == 0  # every step done: the same model again
    again, tok = llmdeploy.load(out)
    ids = ids_for(tok)
    assert torch.equal(first(ids).logits, again(ids).logits)
    assert [e["method"] for e in llmdeploy.applied_recipe(again)] == ["gptq", "pv_tuning"]
