"""``llmdeploy.save`` and the loader of what it writes.

A saved directory holds ``config.json`` (the model config, with the applied recipe),
``model.safetensors``, the tokenizer files, ``recipe.yaml`` and ``llmdeploy.json`` (format
version, the compressed modules with the arguments that rebuild them, the weights' sha256).
Loading rebuilds the architecture from the config, puts empty compressed modules where they
were, and fills everything from safetensors: nothing is unpickled. Saves are atomic: they are
written in a temporary sibling folder and renamed into place.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..compress.base import applied_recipe
from ..compress.modules import MODULES, compressed_modules
from ..errors import CheckpointError
from ..fetch import sha256_file

log = logging.getLogger(__name__)

MANIFEST = "llmdeploy.json"
WEIGHTS = "model.safetensors"
FORMAT = "llmdeploy"
FORMAT_VERSION = 2  # 2: weights may be sharded (a streamed compression writes one file per block)


def save(model: PreTrainedModel, tokenizer, out_dir: str | os.PathLike, *, overwrite: bool = True,
         weights: Callable[[PreTrainedModel, Path], dict[str, Any]] | None = None,
         modules: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write ``model`` (dense or compressed) and ``tokenizer`` to ``out_dir``, atomically.

    An existing ``out_dir`` is replaced only if it is an earlier llmdeploy save (or empty) and
    ``overwrite`` is true; anything else is left alone with an error. ``weights(model, folder)``
    (for streamed models, whose blocks were written as they finished) writes the tensors
    instead of one ``model.safetensors`` and returns the manifest's ``weights`` entry;
    ``modules`` then adds the compressed modules of blocks no longer in memory.
    """
    from .. import __version__

    out = Path(out_dir).expanduser().resolve()
    if out.exists():
        is_ours = (out / MANIFEST).exists() or (out.is_dir() and not any(out.iterdir()))
        if not (overwrite and is_ours):
            raise CheckpointError(
                f"{out} exists and is not an earlier llmdeploy save (or overwrite=False): "
                "choose another output directory or remove it"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        modules = {
            name: {"class": type(m).__name__, "init": m.init_kwargs()}
            for name, m in compressed_modules(model).items()
        } | (modules or {})
        config = model.config
        model_class = None
        remote = getattr(type(model), "remote_code", None)
        if remote is not None:  # a class transformers can rebuild only from a modeling file
            module, filename = remote
            config = copy.deepcopy(model.config)
            config.auto_map = {"AutoModelForCausalLM": f"{Path(filename).stem}.{type(model).__name__}"}
            shutil.copyfile(importlib.import_module(module).__file__, tmp / filename)
            model_class = f"{module}:{type(model).__name__}"
        hf_quant = _hf_quantization_config(model)
        if hf_quant is not None:  # transformers (with the method's package) can load this directory
            config = copy.deepcopy(config) if config is model.config else config
            config.quantization_config = hf_quant
        config.save_pretrained(tmp)
        if weights is None:
            save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
            weights_entry = {"file": WEIGHTS, "sha256": sha256_file(tmp / WEIGHTS)}
        else:
            weights_entry = weights(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        recipe = applied_recipe(model)
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        dtype = str(next(p for p in model.parameters() if p.is_floating_point()).dtype).removeprefix("torch.")
        manifest = {
            "format": FORMAT,
            "format_version": 2 if "files" in weights_entry else 1,
            "llmdeploy_version": __version__,
            "dtype": dtype,
            "recipe": recipe,
            "modules": modules,
            "model_class": model_class,
            "weights": weights_entry,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s", out)
    return out


def _hf_quantization_config(model: PreTrainedModel) -> dict[str, Any] | None:
    """The ``quantization_config`` transformers understands for this model's compressed modules
    (a module class may provide one through ``hf_quantization_config(model)``), or None."""
    classes = {type(m) for m in compressed_modules(model).values()}
    for cls in classes:
        hook = getattr(cls, "hf_quantization_config", None)
        if hook is not None:
            cfg = hook(model)
            if cfg is not None:
                return cfg
    return None


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``llmdeploy.json`` of a saved directory, checked for format and version."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MANIFEST}: not a directory written by llmdeploy.save") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / MANIFEST} is corrupt (not valid JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path / MANIFEST} is not an llmdeploy manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer llmdeploy (format {manifest['format_version']}); upgrade llmdeploy"
        )
    return manifest


def _weight_files(path: Path, manifest: dict[str, Any]) -> dict[str, str | None]:
    """``{file: sha256}`` of the weights a manifest names: one ``model.safetensors`` or, for a
    sharded (streamed) save, every shard of ``model.safetensors.index.json``."""
    entry = manifest.get("weights", {})
    files = dict(entry["files"]) if "files" in entry else {entry.get("file", WEIGHTS): entry.get("sha256")}
    for file in files:
        if not (path / file).exists():
            raise CheckpointError(f"{path} is incomplete: {file} is missing")
    return files


def _load_weights(model: torch.nn.Module, path: Path, files: list[str]) -> None:
    """Fill ``model`` from safetensors ``files``; every tensor must be there exactly once (a tied
    tensor once for all its names), and nothing else."""
    if len(files) == 1:
        try:
            missing, unexpected = load_model(model, str(path / files[0]), strict=False)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path / files[0]} cannot be read ({e}); the file is corrupt") from e
    else:
        state = model.state_dict()
        loaded: set[str] = set()
        unexpected = []
        for file in files:
            try:
                tensors = load_file(str(path / file))
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(f"{path / file} cannot be read ({e}); the file is corrupt") from e
            unexpected += [k for k in tensors if k not in state]
            model.load_state_dict({k: v for k, v in tensors.items() if k in state}, strict=False)
            loaded.update(k for k in tensors if k in state)
        state = model.state_dict()
        have = {state[k].untyped_storage().data_ptr() for k in loaded}
        missing = [k for k in state if k not in loaded and state[k].untyped_storage().data_ptr() not in have]
    if missing or unexpected:
        raise CheckpointError(
            f"the weights in {path} do not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def _model_class(manifest: dict[str, Any], path: Path) -> type:
    """The class a manifest names (only llmdeploy's own modules are imported)."""
    ref = str(manifest["model_class"])
    module, _, name = ref.partition(":")
    if not module.startswith("llmdeploy.") or not name:
        raise CheckpointError(f"{path / MANIFEST} names model class {ref!r}, which is not one of llmdeploy's")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"{path} needs model class {ref!r}, unknown to this llmdeploy ({e}); "
                              "upgrade llmdeploy") from None


def load_saved(path: str | os.PathLike, *, dtype: torch.dtype | None = None, verify: bool = True):
    """Restore a directory written by :func:`save`: the same modules, identical logits."""
    path = Path(path)
    manifest = read_manifest(path)
    files = _weight_files(path, manifest)
    if verify:
        for file, expected in files.items():
            if expected and sha256_file(path / file) != expected:
                raise CheckpointError(
                    f"{path / file} does not match the sha256 recorded in {MANIFEST}: the file is corrupt or "
                    "was changed after saving. Save the model again."
                )
    saved_dtype = getattr(torch, manifest.get("dtype", "float32"))
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} has no readable config.json: {e}") from e
    model = _model_class(manifest, path)(config) if manifest.get("model_class") else \
        AutoModelForCausalLM.from_config(config)
    model.to(saved_dtype)
    for name, spec in manifest.get("modules", {}).items():
        cls = MODULES.get(spec.get("class"))
        if cls is None:
            raise CheckpointError(
                f"{path} uses module class {spec.get('class')!r} for {name}, unknown to this "
                f"llmdeploy (known: {', '.join(sorted(MODULES))}); upgrade llmdeploy"
            )
        try:
            module = cls(**spec["init"], dtype=saved_dtype)
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path / MANIFEST}: the arguments of {name} ({spec.get('class')}) are invalid "
                                  f"({e}); the manifest was edited or is corrupt. Save the model again.") from None
        try:
            model.set_submodule(name, module)
        except AttributeError as e:
            raise CheckpointError(f"{path}: module {name} does not exist in this architecture") from e
    for module in compressed_modules(model).values():
        module.bind(model)
    _load_weights(model, path, list(files))
    if dtype is not None and dtype != saved_dtype:
        model.to(dtype)
    model.eval()
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        log.warning("%s has no tokenizer; returning None", path)
        tok = None
    return model, tok
