"""``llmdeploy.load``: one entry point for zoo names, HF directories or ids, GGUF files and saved dirs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..errors import CheckpointError, UnknownModelError
from .adapters import get_adapter
from .zoo import ZOO

log = logging.getLogger(__name__)


def load(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Accepts a zoo name (``llmdeploy.models.ZOO``: ``smollm2-135m``, ``tiny-llama``...), a
    directory written by :func:`llmdeploy.save`, a Hugging Face model directory, a ``.gguf``
    file (or a folder holding one), or a hub id (only when the hub is reachable or cached).
    The architecture must have an adapter; otherwise a clear error names the supported ones.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name in ZOO and not path.exists():
        model, tok = ZOO[name].loader(dtype)
    elif path.is_file() and path.suffix == ".gguf":
        model, tok = load_gguf(path, dtype=dtype)
    elif path.is_dir():
        model, tok = _load_dir(path, dtype)
    elif path.exists():
        raise CheckpointError(f"{path} is neither a model directory nor a .gguf file")
    else:
        model, tok = _load_hub(name, dtype)
    get_adapter(model)  # fail early, with the list of supported architectures
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok


def _load_dir(path: Path, dtype: torch.dtype):
    from .checkpoint import MANIFEST, load_saved

    if (path / MANIFEST).exists():
        return load_saved(path, dtype=dtype)
    if (path / "config.json").exists():
        quant = _quant_method(path)
        if quant == "aqlm":  # read with llmdeploy's AQLMLinear (kernels, training), not the aqlm package
            from ..quant.aqlm_linear import load_hf_aqlm

            return load_hf_aqlm(path, dtype), AutoTokenizer.from_pretrained(path, local_files_only=True)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"could not load the Hugging Face model in {path}: {e}") from e
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return model, tok
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_gguf(ggufs[0], dtype=dtype)
    raise CheckpointError(
        f"{path} holds no model: expected llmdeploy.json (a directory written by llmdeploy.save), "
        "config.json (a Hugging Face model) or exactly one .gguf file"
    )


def _quant_method(path: Path) -> str | None:
    import json

    try:
        qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    return qc.get("quant_method")


def _load_hub(name: str, dtype: torch.dtype):
    if "/" not in name:
        raise UnknownModelError(
            f"unknown model {name!r}: not a zoo name ({', '.join(sorted(ZOO))}), not an existing "
            "path, and not a hub id of the form 'org/name'"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise UnknownModelError(
            f"could not load {name!r} from the Hugging Face hub or its local cache ({e}). Offline, "
            f"use a local directory, a .gguf file, or a zoo name ({', '.join(sorted(ZOO))})."
        ) from e
    return model, tok


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32):
    """Load a GGUF file through transformers (weights are dequantized to ``dtype``)."""
    path = Path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # gguf parsing errors come in many types
        raise CheckpointError(f"could not read the GGUF file {path}: {e}") from e
    # The weights are now dense: forget the GGUF quantization so a save is a plain HF model.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method", "hf_quantizer"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None if attr != "is_quantized" else False)
            except AttributeError:
                pass
    return model.eval(), tok
