"""Compressing models larger than memory: streamed blocks, spilled activations, per-block resume,
several processes (issue #20)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llmdeploy
from llmdeploy.compress.engine import run_blockwise
from llmdeploy.compress.resume import BlockCheckpoint
from llmdeploy.compress.streaming import ShardWriter, engine_options
from llmdeploy.errors import CheckpointError, ConfigError
from llmdeploy.finetune import LoRAFinetune
from llmdeploy.prune import ShortGPT, SliceGPT, SparseGPT, Wanda
from llmdeploy.quant import AQLM, GPTQ, RTN

FAMILIES = ["tiny-llama", "tiny-opt", "tiny-qwen2"]
STEPS = {
    "gptq": lambda: [GPTQ(bits=4, group_size=32)],
    "gptq-act-order": lambda: [GPTQ(bits=3, group_size=32, act_order=True, symmetric=True)],
    "rtn": lambda: [RTN(bits=4, group_size=32)],
    "sparsegpt": lambda: [SparseGPT(sparsity=0.5)],
    "wanda-2:4": lambda: [Wanda(sparsity=None, pattern="2:4")],
    "slicegpt": lambda: [SliceGPT(sparsity=0.25)],
    "sparsegpt+gptq": lambda: [SparseGPT(sparsity=0.5, compact=False), GPTQ(bits=4, group_size=32)],
    "sparsegpt+rtn": lambda: [SparseGPT(sparsity=0.5), RTN(bits=4, group_size=16)],  # sparse + quantized layers
}


def _source(tmp_path: Path, family: str) -> Path:
    """The family's tiny model saved as a *sharded* Hugging Face checkpoint (several blocks' tensors
    split over files), as large models are published."""
    model, tok = llmdeploy.load(family)
    src = tmp_path / f"src-{family}"
    model.save_pretrained(src, max_shard_size="60KB")
    tok.save_pretrained(src)
    assert (src / "model.safetensors.index.json").exists()
    return src


def _calib(vocab: int, n: int = 6, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))


def _in_memory(src: Path, steps, calib):
    model, _ = llmdeploy.load(src)
    for s in steps:
        model = s(model, calib)
    return model


def _same_model(a, b, calib) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a(calib[:2]).logits, b(calib[:2]).logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe", list(STEPS))
def test_streamed_output_equals_in_memory_output(tmp_path, family, recipe):
    src = _source(tmp_path, family)
    calib = _calib(llmdeploy.load(family)[0].config.vocab_size)
    ref = _in_memory(src, STEPS[recipe](), calib)
    out = llmdeploy.compress_streaming(src, STEPS[recipe](), calib, tmp_path / "out")
    manifest = json.loads((out / "llmdeploy.json").read_text())
    n_blocks = len(llmdeploy.get_adapter(ref).blocks())
    assert sum(f.startswith("block-") for f in manifest["weights"]["files"]) == n_blocks  # one file per block
    assert not (tmp_path / ".out.stream").exists()  # the work folder is removed after success
    streamed, _ = llmdeploy.load(out)
    _same_model(ref, streamed, calib)
    assert llmdeploy.applied_recipe(streamed) == llmdeploy.applied_recipe(ref)


def test_streamed_aqlm_equals_in_memory_aqlm(tmp_path):
    src = _source(tmp_path, "tiny-llama")
    calib = _calib(259)

    def make():
        return [AQLM(num_codebooks=1, nbits_per_codebook=4, in_group_size=8, max_iter=2, steps_per_round=5,
                     kmeans_iters=4, finetune_epochs=1)]

    ref = _in_memory(src, make(), calib)
    out = llmdeploy.compress_streaming(src, make(), calib, tmp_path / "out")
    streamed, _ = llmdeploy.load(out)
    _same_model(ref, streamed, calib)
    assert ref.model.layers[0].self_attn.q_proj.__class__.__name__ == "AQLMLinear"


def test_spilled_activations_give_the_same_model(tmp_path):
    src = _source(tmp_path, "tiny-llama")
    calib = _calib(259)
    ref = _in_memory(src, [GPTQ(bits=4, group_size=32)], calib)
    model, _ = llmdeploy.load(src)
    with engine_options(model, spill_dir=str(tmp_path / "spill")):
        model = GPTQ(bits=4, group_size=32)(model, calib)
    _same_model(ref, model, calib)
    assert not list((tmp_path / "spill").iterdir())  # every spilled batch is deleted once used


class Interrupt(Exception):
    pass


def _interrupt_after(monkeypatch, method: str, index: int) -> list[int]:
    """Make ``method`` (BlockCheckpoint.save or ShardWriter.write_block) raise right after it
    finished block ``index``, as a kill at that point would; returns the blocks it saw."""
    cls = BlockCheckpoint if method == "save" else ShardWriter
    original = getattr(cls, method)
    seen: list[int] = []

    def wrapper(self, i, *args, **kwargs):
        original(self, i, *args, **kwargs)
        seen.append(i)
        if i == index:
            raise Interrupt

    monkeypatch.setattr(cls, method, wrapper)
    return seen


@pytest.mark.parametrize("where", ["checkpoint", "written-not-checkpointed"])
@pytest.mark.parametrize("recipe", ["gptq", "slicegpt", "sparsegpt+gptq"])
def test_streamed_run_resumes_at_the_next_block(tmp_path, monkeypatch, recipe, where):
    src = _source(tmp_path, "tiny-llama")
    calib = _calib(259)
    ref = _in_memory(src, STEPS[recipe](), calib)
    method = "save" if where == "checkpoint" else "write_block"
    with monkeypatch.context() as m:
        _interrupt_after(m, method, 1)
        with pytest.raises(Interrupt):
            llmdeploy.compress_streaming(src, STEPS[recipe](), calib, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="different run"):  # another run's progress is refused
        llmdeploy.compress_streaming(src, [GPTQ(bits=8, group_size=32)], calib, tmp_path / "out", resume=True,
                                     work_dir=tmp_path / ".out.stream")
    with monkeypatch.context() as m:
        seen = _interrupt_after(m, "save", -1)
        out = llmdeploy.compress_streaming(src, STEPS[recipe](), calib, tmp_path / "out", resume=True)
    # the first step restarts after its finished blocks (block 1 is redone when it was written
    # but not yet checkpointed); a second step runs whole
    first = seen[: 3 - (2 if where == "checkpoint" else 1)]
    assert first == ([2] if where == "checkpoint" else [1, 2])
    streamed, _ = llmdeploy.load(out)
    _same_model(ref, streamed, calib)


IN_MEMORY = {**STEPS, "shortgpt": lambda: [ShortGPT(n_remove=1)]}


@pytest.mark.parametrize("recipe", ["gptq", "slicegpt", "sparsegpt", "shortgpt"])
def test_in_memory_run_resumes_at_the_next_block(tmp_path, monkeypatch, recipe):
    src = _source(tmp_path, "tiny-llama")
    calib = _calib(259)
    ref = _in_memory(src, IN_MEMORY[recipe](), calib)
    model, _ = llmdeploy.load(src)
    with monkeypatch.context() as m:
        _interrupt_after(m, "save", 0)
        with pytest.raises(Interrupt), engine_options(model, checkpoint_dir=str(tmp_path / "ck")):
            IN_MEMORY[recipe]()[0](model, calib)
    model, _ = llmdeploy.load(src)  # a fresh process would start from the source again
    with monkeypatch.context() as m:
        seen = _interrupt_after(m, "save", -1)
        with engine_options(model, checkpoint_dir=str(tmp_path / "ck"), resume=True):
            model = IN_MEMORY[recipe]()[0](model, calib)
    assert seen == [1, 2]
    _same_model(ref, model, calib)


def test_steps_that_need_the_whole_model_refuse_to_stream(tmp_path):
    src = _source(tmp_path, "tiny-llama")
    calib = _calib(259)
    with pytest.raises(ConfigError, match="cannot run on streamed blocks"):
        llmdeploy.compress_streaming(src, [GPTQ(bits=4, group_size=32), ShortGPT(n_remove=1)], calib, tmp_path / "o")
    with pytest.raises(ConfigError, match="cannot run on streamed blocks"):
        llmdeploy.compress_streaming(src, [LoRAFinetune()], calib, tmp_path / "o")
    with pytest.raises(CheckpointError, match="safetensors"):
        llmdeploy.compress_streaming(tmp_path, [RTN()], None, tmp_path / "o")


def test_a_walk_without_a_resume_key_refuses_a_checkpoint_folder(tmp_path):
    model, _ = llmdeploy.load("tiny-llama")
    with engine_options(model, checkpoint_dir=str(tmp_path)), pytest.raises(ConfigError, match="cannot checkpoint"):
        run_blockwise(model, _calib(259), lambda ctx: None)


def test_device_map_computes_each_block_where_it_lives():
    """``device="map"``: blocks stay where a device map put them; only activations move (on this
    CPU-only machine every block is on the CPU, and the result must equal the default)."""
    calib = _calib(259)
    a, _ = llmdeploy.load("tiny-llama")
    b, _ = llmdeploy.load("tiny-llama")
    a = GPTQ(bits=4, group_size=32)(a, calib)
    b = GPTQ(bits=4, group_size=32, device="map")(b, calib)
    _same_model(a, b, calib)


def test_two_processes_compute_what_one_process_computes(tmp_path):
    """torchrun with 2 gloo processes, each on half the calibration windows: every process holds
    the same compressed model (bitwise), and it equals the single-process one to tolerance (the
    statistics are summed in another order)."""
    from llmdeploy.kv.distributed import free_port

    src = _source(tmp_path, "tiny-llama")
    calib = _calib(259, n=8)
    torch.save(calib, tmp_path / "calib.pt")
    out = tmp_path / "dist"
    out.mkdir()
    script = Path(__file__).with_name("_torchrun_compress.py")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), str(script), str(src), str(out), str(tmp_path / "calib.pt")],
                   check=True, timeout=300, capture_output=True)
    d0, d1 = (json.loads((out / f"digests-{r}.json").read_text()) for r in (0, 1))
    assert d0 == d1
    import importlib.util
    spec = importlib.util.spec_from_file_location("tc", script)
    tc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tc)
    # AQLM's block fine-tuning on 2 processes: the same Adam steps as one process — the relative
    # output errors before and after each epoch agree (and fall), on both processes
    h0, h1 = (json.loads((out / f"finetune-{r}.json").read_text()) for r in (0, 1))
    step = tc.STEPS["aqlm_ft"]()
    step(llmdeploy.load(src)[0], calib)
    assert h0 == h1 and set(h0) == set(step.report_.finetune)
    for block, hist in step.report_.finetune.items():
        assert hist[-1] < hist[0]
        assert h0[block] == pytest.approx(hist, rel=1e-3)
    for name, make in tc.STEPS.items():
        ref = _in_memory(src, [make()], calib)
        got = load_file(str(out / f"{name}.safetensors"))
        model, _ = llmdeploy.load(src)
        model = make()(model, calib)  # the single-process structure, filled with the 2-process tensors
        model.load_state_dict(got)
        with torch.no_grad():
            a, b = ref(calib[:2]).logits, model(calib[:2]).logits
        torch.testing.assert_close(b, a, rtol=0, atol=2e-3 * a.abs().max().item())
        for k, v in ref.state_dict().items():
            if k.endswith("qweight"):  # codes may flip where a value sits on a rounding boundary
                assert (got[k] == v).float().mean() > 0.99, k
    streamed, _ = llmdeploy.load(out / "streamed")
    assert streamed(calib[:1]).logits.isfinite().all()


DEEP = textwrap.dedent("""
    import resource, sys, torch, llmdeploy
    from llmdeploy.quant import GPTQ
    src, out, mode, cap = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    calib = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    def vm_data():
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    limit = vm_data() + cap
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:
        if mode == "stream":
            llmdeploy.compress_streaming(src, [GPTQ(bits=4, group_size=64)], calib, out)
        else:
            model, _ = llmdeploy.load(src)
            GPTQ(bits=4, group_size=64)(model, calib)
    except MemoryError:
        print("MemoryError"); sys.exit(3)
    print("ok")
""")


def test_streaming_compresses_a_deep_model_under_a_memory_cap(tmp_path):
    """A generated 48-block model of 3.1M parameters per block (600 MB in float32, sharded): with
    the process's data segment capped at 160 MB above its size after imports, the streamed run
    succeeds and the in-memory run runs out of memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=32,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    src = tmp_path / "deep"
    model.save_pretrained(src, max_shard_size="20MB")
    del model
    script = tmp_path / "deep.py"
    script.write_text(DEEP)
    cap = str(250 * 2**20)
    run = [sys.executable, str(script), str(src), str(tmp_path / "out")]
    streamed = subprocess.run([*run, "stream", cap], capture_output=True, text=True, timeout=600)
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    in_memory = subprocess.run([*run, "memory", cap], capture_output=True, text=True, timeout=600)
    assert in_memory.returncode != 0
    out, _ = llmdeploy.load(tmp_path / "out", tokenizer="tiny-llama")
    assert len(out.model.layers) == 32


def test_cli_streams_on_request_and_resumes(tmp_path, capsys, monkeypatch):
    from llmdeploy.cli.main import main

    src = _source(tmp_path, "tiny-llama")
    args = ["compress", str(src), "--recipe", "sparsegpt-50", "-o", str(tmp_path / "out"), "--n-samples", "4",
            "--seq-len", "32"]
    assert main([*args, "--no-stream", "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    ref, tok = llmdeploy.load(tmp_path / "out")
    with monkeypatch.context() as m:
        _interrupt_after(m, "write_block", 1)
        with pytest.raises(Interrupt):
            main([*args, "--stream"])
    assert main([*args, "--stream", "--resume"]) == 0
    assert "streamed block by block" in capsys.readouterr().out
    streamed, _ = llmdeploy.load(tmp_path / "out")
    _same_model(ref, streamed, _calib(259))
    assert main(["info", str(tmp_path / "out")]) == 0
    assert "sparsegpt(" in capsys.readouterr().out
    assert main(["compress", "tiny-llama", "--recipe", "rtn-4bit", "-o", str(tmp_path / "o2"), "--stream"]) == 2
    assert "--stream reads a model directory with safetensors" in capsys.readouterr().err


def test_cli_streams_automatically_when_the_model_would_not_fit(tmp_path, monkeypatch, caplog):
    import psutil

    from llmdeploy.cli.main import main

    src = _source(tmp_path, "tiny-llama")

    class Tiny:
        available = 1000  # bytes: nothing fits

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny)
    rec = tmp_path / "r.yaml"
    rec.write_text("- method: rtn\n  bits: 4\n  group_size: 32\n")
    assert main(["compress", str(src), "--recipe", str(rec), "-o", str(tmp_path / "out")]) == 0
    assert "would not fit in memory" in caplog.text
    assert "block-00000.safetensors" in json.loads((tmp_path / "out" / "llmdeploy.json").read_text())["weights"]["files"]


def test_in_memory_cli_run_resumes_at_the_next_block(tmp_path, monkeypatch):
    from llmdeploy.cli.main import main

    args = ["compress", "tiny-llama", "--recipe", "sparsegpt-50", "-o", str(tmp_path / "out"), "--n-samples", "4",
            "--seq-len", "32", "--checkpoint-dir", str(tmp_path / "ck")]
    with monkeypatch.context() as m:
        _interrupt_after(m, "save", 1)
        with pytest.raises(Interrupt):
            main(args)
    with monkeypatch.context() as m:
        seen = _interrupt_after(m, "save", -1)
        assert main([*args, "--resume"]) == 0
    assert seen == [2]
    out, tok = llmdeploy.load(tmp_path / "out")
    ref, _ = llmdeploy.load("tiny-llama")
    calib = llmdeploy.data.calibration(tok, "shakespeare", n_samples=4, seq_len=32, seed=0)
    _same_model(SparseGPT(sparsity=0.5)(ref, calib), out, calib)


def test_write_safetensors_round_trips_every_dtype(tmp_path):
    from llmdeploy.compress.streaming import write_safetensors

    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).to(torch.bfloat16), "scalar": torch.tensor(3),
               "empty": torch.zeros(0, 2), "u8": torch.arange(7, dtype=torch.uint8),
               "transposed": torch.randn(4, 6).T, "f16": torch.randn(2, 2).half(), "bool": torch.tensor([True, False])}
    write_safetensors(tmp_path / "t.safetensors", tensors, {"format": "pt"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_readme_quotes_the_streaming_benchmark():
    from benchmarks.streaming import readme_paragraph

    root = Path(__file__).resolve().parent.parent
    res = json.loads((root / "benchmarks/results/streaming/streaming.json").read_text())
    readme = " ".join((root / "README.md").read_text().split())
    assert " ".join(readme_paragraph(res).split()) in readme
    table = (root / "benchmarks/results/streaming/STREAMING.md").read_text()
    for r in res["memory"]:
        assert f"| {r['model']} | {r['method']} | {r['mode']} | {r['peak'] / 2**20:.0f} |" in table
