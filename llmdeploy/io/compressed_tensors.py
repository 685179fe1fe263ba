"""Export RTN/GPTQ models in the compressed-tensors format (llm-compressor's, loaded by vLLM and by
transformers with the ``compressed-tensors`` package).

:func:`save_compressed_tensors` writes a Hugging Face directory whose quantized linears hold
``weight_packed`` (the codes as a dense little-endian bit stream in int32 words — our own packing
is the same stream, so the bytes are reused), ``weight_scale`` (fp32, one per group: our fp16 scales
widened exactly), ``weight_shape`` and, for asymmetric grids, ``weight_zero_point`` (packed along
the output dimension). Codes ``c`` with zero point ``z`` are compressed-tensors' signed values
``c − 2^(b−1)`` and ``z − 2^(b−1)``: the dequantized weight ``(c − z)·s`` is unchanged, so the loaded
model computes our logits. ``config.json`` gets the matching ``quantization_config``
("pack-quantized", one config group per (bits, group size, symmetry), targets by module name).

This is an export (a second directory), not llmdeploy's own checkpoint: ``llmdeploy.save`` keeps the
documented layout that :func:`llmdeploy.load` reads.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..compress.modules import compressed_modules
from ..errors import CheckpointError, ConfigError
from ..quant.packing import pack
from ..quant.rtn import RTNLinear

WEIGHTS = "model.safetensors"


def _words(packed_bytes: torch.Tensor, n_words: int) -> torch.Tensor:
    """uint8 bit stream (rows, bytes) -> int32 words (rows, n_words), zero-padded (little-endian)."""
    pad = 4 * n_words - packed_bytes.shape[1]
    b = torch.nn.functional.pad(packed_bytes.contiguous(), (0, pad)) if pad > 0 else packed_bytes[:, :4 * n_words]
    return b.contiguous().view(torch.int32)


def _module_tensors(mod: RTNLinear) -> dict[str, torch.Tensor]:
    bits, out_f, in_f = mod.bits, mod.out_features, mod.in_features
    words = -(-in_f * bits // 32)
    t = {"weight_packed": _words(mod.qweight.cpu(), words),
         "weight_scale": mod.scales.float().cpu().contiguous(),
         "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64)}
    if mod.zeros is not None:  # packed along the output dimension: transpose, pack as a bit stream, back
        zt = mod.zeros.cpu().T.contiguous()  # (groups, out) unsigned = signed + 2^(b-1)
        pad = (-out_f) % 8
        zb = pack(torch.nn.functional.pad(zt, (0, pad)), bits)
        t["weight_zero_point"] = _words(zb, -(-out_f * bits // 32)).T.contiguous()
    if mod.bias is not None:
        t["bias"] = mod.bias.detach().cpu().contiguous()
    return t


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """compressed-tensors' ``quantization_config`` for the RTN/GPTQ layers of ``model``."""
    groups: dict[tuple[int, int | None, bool], list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, RTNLinear):
            gs = None if m.group_size == m.in_features else m.group_size
            groups.setdefault((m.bits, gs, m.symmetric), []).append(name)
    config_groups = {}
    for i, ((bits, gs, sym), names) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        config_groups[f"group_{i}"] = {
            "targets": names,
            "weights": {"num_bits": bits, "type": "int", "symmetric": sym, "group_size": gs,
                        "strategy": "channel" if gs is None else "group", "dynamic": False,
                        "actorder": None, "observer": "minmax"},
            "input_activations": None, "output_activations": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": [], "kv_cache_scheme": None}


def save_compressed_tensors(model: nn.Module, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write ``model`` (its quantized linears RTN/GPTQ layers, everything else dense) and
    ``tokenizer`` to ``out_dir`` in the compressed-tensors format, atomically."""
    rtn = {n: m for n, m in model.named_modules() if isinstance(m, RTNLinear)}
    others = sorted(n for n, m in compressed_modules(model).items() if not isinstance(m, RTNLinear))
    if not rtn:
        raise ConfigError("save_compressed_tensors: the model has no RTN/GPTQ layers (RTNLinear) to export")
    if others:
        raise ConfigError(f"save_compressed_tensors: {others[:3]} are {type(model.get_submodule(others[0])).__name__}, "
                          "which the compressed-tensors export does not express; export a model quantized "
                          "only with RTN or GPTQ, or use llmdeploy.save")
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner in rtn:
            continue
        if t.data_ptr() in seen:  # tied tensors once (transformers re-ties them on load)
            continue
        seen.add(t.data_ptr())
        state[name] = t.detach().cpu().contiguous()
    for name, m in rtn.items():
        for k, v in _module_tensors(m).items():
            state[f"{name}.{k}"] = v
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty: choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        config = copy.deepcopy(model.config)
        config.quantization_config = quantization_config(model)
        config.save_pretrained(tmp)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
