"""ONNX export: ``export_onnx(model, tokenizer, out_dir)`` — the model's full-sequence forward
(``input_ids``, ``attention_mask`` → ``logits``) as an ONNX graph that ONNX Runtime runs.

* Dense, pruned, sliced and layer-removed models export as they compute (torch's dynamo-based
  exporter, dynamic batch and sequence axes).
* 4-bit RTN/GPTQ layers (``RTNLinear``, group sizes that are powers of two ≥ 16) export as ONNX
  Runtime's ``com.microsoft.MatMulNBits`` — packed 4-bit codes, float scales, packed 4-bit zero
  points, dequantized inside the matmul — so the file stays ~4 bits per weight. The codes,
  scales and zero points are this library's own, re-laid out (exactly: the op's dequantization
  (q − z)·s is the layer's).
* Every other compressed module (AQLM, other bit widths, sparse, W8A8) exports as a dense
  ``MatMul`` of its dequantized weight: ONNX has no operator for them. ``report`` says which
  layers went which way.

The graph has no KV cache: a generation loop over it recomputes the prefix (use it for scoring,
embedding or prefill; decoding with ONNX Runtime's GenAI runtime needs its own export).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..compress.modules import compressed_modules
from ..errors import ConfigError

log = logging.getLogger(__name__)


@torch.library.custom_op("llmdeploy::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, K: int, N: int,
                 bits: int, block_size: int) -> torch.Tensor:
    """``x @ W.T`` with W in MatMulNBits' layout: ``qweight`` uint8 (N, K/block, block·bits/8),
    codes packed low nibble first; ``scales`` (N·K/block); ``zeros`` uint8, two 4-bit zero points
    per byte, (N·ceil(K/block / 2))."""
    n_blocks = K // block_size
    q = torch.stack([qweight & 0xF, qweight >> 4], dim=-1).reshape(N, n_blocks, block_size).float()
    z = torch.stack([zeros & 0xF, zeros >> 4], dim=-1).reshape(N, -1)[:, :n_blocks].float()
    w = (q - z[..., None]) * scales.reshape(N, n_blocks)[..., None]
    return x @ w.reshape(N, K).to(x.dtype).T


@matmul_nbits.register_fake
def _(x, qweight, scales, zeros, K, N, bits, block_size):
    return x.new_empty(*x.shape[:-1], N)


class NBitsLinear(nn.Module):
    """An RTN 4-bit linear in MatMulNBits' layout (what the export traces)."""

    def __init__(self, layer) -> None:
        super().__init__()
        n, k, g = layer.out_features, layer.in_features, layer.group_size
        codes = layer.codes().to(torch.uint8).reshape(n, k // g, g)
        self.register_buffer("qweight", codes[..., 0::2] | (codes[..., 1::2] << 4))
        self.register_buffer("scales", layer.scales.float().reshape(-1).contiguous())
        zeros = layer.zeros if layer.zeros is not None else torch.full_like(layer.scales, 8, dtype=torch.uint8)
        zeros = zeros.to(torch.uint8)
        if zeros.shape[1] % 2:
            zeros = torch.cat([zeros, torch.zeros_like(zeros[:, :1])], dim=1)
        self.register_buffer("zeros", (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).reshape(-1).contiguous())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.K, self.N, self.block_size = k, n, g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.llmdeploy.matmul_nbits(x, self.qweight, self.scales, self.zeros, self.K, self.N, 4,
                                             self.block_size)
        return y if self.bias is None else y + self.bias


def _nbits_applies(module) -> bool:
    from ..quant.rtn import RTNLinear

    g = getattr(module, "group_size", 0)
    return (isinstance(module, RTNLinear) and module.bits == 4 and g >= 16 and g & (g - 1) == 0
            and module.in_features % g == 0)


def _dense(module) -> nn.Module:
    """The plain module computing what a compressed one computes (its dequantized weight)."""
    from ..quant.embedding import RTNEmbedding

    with torch.no_grad():
        w = module.weight if isinstance(getattr(type(module), "weight", None), property) else module.dequantize()
        w = w.detach().float()
        if isinstance(module, RTNEmbedding):
            return nn.Embedding.from_pretrained(w, freeze=True)
        bias = getattr(module, "bias", None)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias.detach().float())
    return lin


@dataclass
class OnnxExportReport:
    path: str = ""
    matmul_nbits: list[str] = field(default_factory=list)
    dequantized: dict[str, str] = field(default_factory=dict)  # layer -> its module type
    bytes: int = 0  # the file
    weight_bytes: int = 0  # its initializers (weights, codes, scales, constants)

    def summary(self) -> str:
        return (f"{self.path}: {self.bytes / 2**20:.1f} MiB ({self.weight_bytes / 2**20:.1f} MiB of weights); "
                f"{len(self.matmul_nbits)} layers as MatMulNBits (4-bit), "
                f"{len(self.dequantized)} compressed layers exported dense")


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _translation_table() -> dict:
    import onnxscript
    from onnx.defs import OpSchema

    # ONNX Runtime's contrib op; the onnx package has no schema for it, so it is declared here
    P, A = OpSchema.FormalParameter, OpSchema.Attribute
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1"), P("zero_points", "T3")],
        outputs=[P("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)"], "")],
        attributes=[A(name, OpSchema.AttrType.INT, "") for name in ("K", "N", "bits", "block_size")],
    )
    op = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MatMulNBits", schema)

    def matmul_nbits_onnx(x, qweight, scales, zeros, K: int, N: int, bits: int, block_size: int):
        return op(x, qweight, scales, zeros, K=K, N=N, bits=bits, block_size=block_size)

    return {torch.ops.llmdeploy.matmul_nbits.default: matmul_nbits_onnx}


def export_onnx(model: nn.Module, tokenizer, out_dir: str | os.PathLike, *, int4: bool = True,
                opset: int = 18) -> OnnxExportReport:
    """Write ``out_dir/model.onnx`` (and the tokenizer) for ONNX Runtime; returns what was done.
    ``int4=False`` exports 4-bit layers dense too (for runtimes without MatMulNBits)."""
    try:
        import onnx
        import onnx.numpy_helper
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"ONNX export needs the onnx and onnxscript packages ({e}): pip install onnx onnxscript "
                          "onnxruntime") from e
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = OnnxExportReport(path=str(out / "model.onnx"))
    m = copy.deepcopy(model).float().eval()
    for name, module in compressed_modules(m).items():
        if int4 and _nbits_applies(module):
            m.set_submodule(name, NBitsLinear(module))
            report.matmul_nbits.append(name)
        else:
            m.set_submodule(name, _dense(module))
            report.dequantized[name] = type(module).__name__
    if report.dequantized:
        log.info("ONNX export: %d compressed layers exported dense (%s)", len(report.dequantized),
                 ", ".join(sorted(set(report.dequantized.values()))))
    ids = torch.randint(0, min(100, getattr(model.config, "vocab_size", 100)), (2, 8))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2, max=1 << 16)
    tmp = out / "model.onnx.partial"
    with torch.no_grad():
        prog = torch.onnx.export(_Logits(m), (ids, torch.ones_like(ids)), dynamo=True, opset_version=opset,
                                 input_names=["input_ids", "attention_mask"], output_names=["logits"],
                                 dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                 "attention_mask": {0: batch, 1: seq}},
                                 custom_translation_table=_translation_table() if report.matmul_nbits else None,
                                 verbose=False)
    prog.save(str(tmp), external_data=False)
    os.replace(tmp, out / "model.onnx")  # atomic: a file named model.onnx is a whole graph
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    report.bytes = (out / "model.onnx").stat().st_size
    graph = onnx.load(str(out / "model.onnx")).graph
    report.weight_bytes = sum(onnx.numpy_helper.to_array(t).nbytes for t in graph.initializer)
    (out / "onnx_export.json").write_text(json.dumps({"matmul_nbits": report.matmul_nbits,
                                                      "dequantized": report.dequantized, "opset": opset}, indent=1))
    log.info("ONNX export: %s", report.summary())
    return report
