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

from ..compress.modules import HF_LOADERS
from ..errors import CheckpointError, UnknownModelError, UnsupportedArchitectureError
from ..models.adapters import get_adapter
from .zoo import ZOO

log = logging.getLogger(__name__)


def load(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Accepts a zoo name (``llmdeploy.io.ZOO``: ``smollm2-135m``, ``tiny-llama``...), a
    directory written by :func:`llmdeploy.save`, a Hugging Face model directory, a ``.gguf``
    file (or a folder holding one), or a hub id (only when the hub is reachable or cached).
    The architecture must have an adapter; otherwise a clear error names the supported ones.
    ``tokenizer`` (a tokenizer, a directory, a zoo name or a hub id) is used instead of the one
    stored with the model: needed for model directories saved without one.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name in ZOO and not path.exists():
        model, tok = ZOO[name].loader(dtype)
    elif path.is_file() and path.suffix == ".gguf":
        model, tok = load_gguf(path, dtype=dtype)
    elif path.is_dir():
        model, tok = _load_dir(path, dtype, tokenizer)
    elif path.exists():
        raise CheckpointError(f"{path} is neither a model directory nor a .gguf file")
    else:
        model, tok = _load_hub(name, dtype)
    get_adapter(model)  # fail early, with the list of supported architectures
    if tokenizer is not None:
        tok = _tokenizer(path, tokenizer)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok


def _tokenizer(path: Path, tokenizer=None) -> PreTrainedTokenizerBase:
    """``tokenizer`` if given (an object, a zoo name, a directory or a hub id), else the one
    stored in ``path``; a clear error when there is none."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if tokenizer is not None and str(tokenizer) in ZOO and not Path(str(tokenizer)).exists():
        return ZOO[str(tokenizer)].loader(torch.float32)[1]
    source = Path(str(tokenizer)).expanduser() if tokenizer is not None else path
    local = tokenizer is None or source.exists()
    try:
        return AutoTokenizer.from_pretrained(source if local else str(tokenizer), local_files_only=local)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError/ImportError here
        where = f"{source}" if local else repr(str(tokenizer))
        raise CheckpointError(
            f"no usable tokenizer in {where} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}). "
            "Pass one: llmdeploy.load(path, tokenizer='DIR or hub id or zoo name') "
            "(CLI: --tokenizer)"
        ) from None


def _has_tokenizer(path: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
    return any((path / n).exists() for n in names)


def _load_dir(path: Path, dtype: torch.dtype, tokenizer=None):
    from .checkpoint import MANIFEST, load_saved

    if (path / MANIFEST).exists():
        model, tok = load_saved(path, dtype=dtype)
        if tok is None and tokenizer is None:
            raise CheckpointError(f"{path} was saved without a tokenizer: pass one, "
                                  "llmdeploy.load(path, tokenizer='DIR or hub id or zoo name')")
        return model, tok
    if (path / "config.json").exists():
        quant = _quant_method(path)
        if quant in HF_LOADERS:  # a method of ours reads its own format (e.g. AQLM into AQLMLinear)
            return HF_LOADERS[quant](path, dtype), (None if tokenizer is not None else _tokenizer(path))
        if tokenizer is None and not _has_tokenizer(path):
            raise CheckpointError(f"{path} holds a model but no tokenizer files: pass one, "
                                  "llmdeploy.load(path, tokenizer='DIR or hub id or zoo name') (CLI: --tokenizer)")
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as e:
            raise _unsupported_or_corrupt(path, e) from e
        return model, (None if tokenizer is not None else _tokenizer(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_gguf(ggufs[0], dtype=dtype)
    raise CheckpointError(
        f"{path} holds no model: expected llmdeploy.json (a directory written by llmdeploy.save), "
        "config.json (a Hugging Face model) or exactly one .gguf file"
    )


def _unsupported_or_corrupt(path: Path, e: Exception) -> Exception:
    """An UnsupportedArchitectureError for a model type transformers does not know, else a
    CheckpointError."""
    msg = str(e)
    if "model type" in msg or "does not recognize this architecture" in msg or "not supported" in msg:
        from ..models.adapters import supported_model_types

        return UnsupportedArchitectureError(
            f"{path}: the architecture is not supported ({msg.splitlines()[0][:200]}); llmdeploy supports "
            f"{', '.join(supported_model_types())}")
    return CheckpointError(f"could not load the Hugging Face model in {path}: {msg.splitlines()[0][:300] if msg else type(e).__name__}")


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


def _gguf_architecture(path: Path) -> str | None:
    """``general.architecture`` of a GGUF file, or None if it cannot be read."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("general.architecture")
        return bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except Exception:  # noqa: BLE001 - a corrupt file is reported by the load itself
        return None


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32):
    """Load a GGUF file through transformers (weights are dequantized to ``dtype``)."""
    path = Path(path)
    arch = _gguf_architecture(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # gguf parsing errors come in many types
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if arch is not None and ("not supported" in msg or "architecture" in msg.lower()):
            from ..models.adapters import supported_model_types

            raise UnsupportedArchitectureError(
                f"the GGUF file {path} holds a {arch!r} model, which transformers cannot read from GGUF "
                f"({msg}); llmdeploy supports {', '.join(supported_model_types())}") from None
        raise CheckpointError(f"could not read the GGUF file {path}: {msg}") from e
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
