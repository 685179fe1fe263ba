"""ONNX export (issue #19): the exported graph, run by onnxruntime, gives the model's logits —
dense, layer-removed, sliced, pruned, and 4-bit RTN through onnxruntime's MatMulNBits."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

import llmdeploy
from llmdeploy.data import calibration
from llmdeploy.io import export_onnx
from llmdeploy.io.onnx_export import matmul_nbits
from llmdeploy.prune import DropLayers, SliceGPT, SparseGPT
from llmdeploy.quant import GPTQ, RTN

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def tiny():
    model, tok = llmdeploy.load("tiny-llama")
    return model.eval(), tok, calibration(tok, "shakespeare", n_samples=8, seq_len=32, seed=0)


def run_onnx(path, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]


def assert_parity(model, path) -> None:
    """Logits of onnxruntime equal torch's on shapes other than the traced one, padding included."""
    g = torch.Generator().manual_seed(0)
    for shape in ((3, 21), (1, 1), (2, 5)):
        ids = torch.randint(3, 250, shape, generator=g)
        mask = torch.ones_like(ids)
        if shape[1] > 3:
            mask[0, :3] = 0  # a left-padded row
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).logits.numpy()
        out = run_onnx(path, ids, mask)
        valid = mask.numpy().astype(bool)
        np.testing.assert_allclose(out[valid], ref[valid], rtol=1e-4, atol=1e-4)


def make(kind: str, dense, calib):
    m = copy.deepcopy(dense)
    return {
        "dense": lambda: m,
        "layer-removed": lambda: DropLayers(layers=[1])(m),
        "sliced": lambda: SliceGPT(sparsity=0.25)(m, calib),
        "pruned": lambda: SparseGPT(sparsity=0.5)(m, calib),
        "rtn-3bit": lambda: RTN(bits=3, group_size=16)(m, None),
    }[kind]()


@pytest.mark.parametrize("kind", ["dense", "layer-removed", "sliced", "pruned", "rtn-3bit"])
def test_exported_model_matches_torch_in_onnxruntime(tiny, tmp_path, kind):
    dense, tok, calib = tiny
    model = make(kind, dense, calib)
    report = export_onnx(model, tok, tmp_path)
    assert not report.matmul_nbits  # nothing 4-bit here: compressed layers (if any) go dense
    assert (tmp_path / "tokenizer_config.json").exists()
    assert_parity(model, tmp_path)


@pytest.mark.parametrize("method", ["rtn-asym", "rtn-sym", "gptq"])
def test_4bit_layers_export_as_matmulnbits(tiny, tmp_path, method):
    dense, tok, calib = tiny
    model = {"rtn-asym": lambda m: RTN(bits=4, group_size=16)(m, None),
             "rtn-sym": lambda m: RTN(bits=4, group_size=32, symmetric=True)(m, None),
             "gptq": lambda m: GPTQ(bits=4, group_size=16)(m, calib)}[method](copy.deepcopy(dense))
    report = export_onnx(model, tok, tmp_path)
    n_linears = len(llmdeploy.get_adapter(model).linear_names())
    assert len(report.matmul_nbits) == n_linears and not report.dequantized
    ops = [n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    assert ops.count("MatMulNBits") == n_linears
    assert_parity(model, tmp_path)
    # the file holds 4-bit codes, fp32 scales and 4-bit zero points in place of fp32 weights
    dense_report = export_onnx(dense, tok, tmp_path / "dense")
    fp32, packed = 0, 0
    for name in llmdeploy.get_adapter(model).linear_names():
        layer = model.get_submodule(name)
        n, k, g = layer.out_features, layer.in_features, layer.group_size
        fp32 += 4 * n * k
        packed += n * k // 2 + 4 * n * (k // g) + n * -(-(k // g) // 2)
    assert dense_report.weight_bytes - report.weight_bytes >= 0.95 * (fp32 - packed)


def test_matmul_nbits_reference_equals_the_rtn_layer():
    from llmdeploy.io.onnx_export import NBitsLinear
    from llmdeploy.quant.rtn import RTNLinear

    lin = torch.nn.Linear(64, 24, bias=True)
    for sym in (False, True):
        layer = RTNLinear.from_linear(lin, 4, 16, sym)
        x = torch.randn(3, 64)
        with torch.no_grad():
            torch.testing.assert_close(NBitsLinear(layer)(x), layer(x), rtol=1e-5, atol=1e-5)
    assert matmul_nbits._opoverload is not None  # registered as a torch op (what the exporter maps)


def test_cli_export(tmp_path):
    out = subprocess.run([sys.executable, "-m", "llmdeploy", "export", "tiny-llama", "-o", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MatMulNBits" in out.stdout and (tmp_path / "x" / "model.onnx").exists()


def test_docs_quote_the_onnx_speed_benchmark():
    """The ONNX Runtime / torch speed ratios in docs/index.md are those of benchmarks/results/onnx/onnx.json."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    res = json.loads((root / "benchmarks/results/onnx/onnx.json").read_text())
    doc = " ".join((root / "docs/index.md").read_text().split())

    def span(model: str) -> str:
        v = [r["ort_speed_vs_torch"] for r in res["rows"].values() if r["model"] == model]
        return f"{min(v):.2f}–{max(v):.2f}×"

    assert f"ONNX Runtime runs the dense model {span('dense fp32')} and the RTN 4-bit one (`MatMulNBits`) " \
           f"{span('RTN 4-bit g32')} as fast as torch" in doc
    assert all(r["max_abs_logit_diff"] < 1e-2 for r in res["rows"].values())  # the same model, timed
    rows = [r for r in res["rows"].values() if r["batch"] == 1 and r["model"] == "dense fp32"]
    assert sorted(rows, key=lambda r: r["tokens"]) == sorted(rows, key=lambda r: -r["ort_speed_vs_torch"])  # "narrowing"
