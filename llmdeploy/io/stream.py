"""Compress a model that does not fit in memory: its blocks are streamed from disk.

``compress_streaming(source, recipe, calib, output)`` builds a *skeleton* of the source model —
embeddings, final norm and head loaded, decoder blocks on the ``meta`` device — and runs each
recipe step with the engine streaming the blocks (:mod:`llmdeploy.compress.streaming`): block
*i* is read from the source's safetensors (sharded or not; memory-mapped), compressed, written
to its own file, and freed. A recipe of several steps runs as several passes, each reading the
previous pass's output, so the result equals applying the recipe in memory (a step calibrates
on the model the previous steps produced, exactly as there). The output is an llmdeploy save
with sharded weights (``model.safetensors.index.json``), which ``llmdeploy.load`` and, for
formats transformers knows, ``from_pretrained`` read.

Interrupted, the same call with ``resume=True`` continues: finished steps are kept, and inside
a step the blocks already written are kept and the walk restarts at the next block from the
checkpointed activations (``work_dir`` holds all of it; it is removed after success).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import psutil
import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from ..compress.base import METHODS, Compose, Compressor, check_calibration
from ..compress.distributed import barrier, is_main
from ..compress.modules import MODULES, compressed_modules
from ..compress.streaming import (
    INDEX,
    SINGLE,
    BlockStream,
    CheckpointReader,
    ShardWriter,
    engine_options,
    map_large_allocations,
    write_safetensors,
)
from ..errors import CheckpointError, ConfigError
from ..fetch import sha256_file
from ..models.adapters import get_adapter
from .checkpoint import MANIFEST, _model_class, read_manifest, save
from .loading import _has_tokenizer, _tokenizer

log = logging.getLogger(__name__)

REST = "rest.safetensors"


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """Bytes of the safetensors weights of a model directory (what loading it costs, roughly)."""
    path = Path(path)
    files = {SINGLE} if (path / SINGLE).exists() else set()
    if (path / INDEX).exists():
        files = set(json.loads((path / INDEX).read_text())["weight_map"].values())
    elif (path / MANIFEST).exists():
        entry = read_manifest(path).get("weights", {})
        files = set(entry.get("files", {entry.get("file", SINGLE): None}))
    return sum((path / f).stat().st_size for f in files if (path / f).exists())


def fits_in_memory(path: str | os.PathLike, dtype: torch.dtype = torch.float32, margin: float = 2.0) -> bool:
    """Whether loading the model at ``path`` in ``dtype`` leaves room: ``margin`` times its size
    (the model plus a compression's working copies) below the memory available now."""
    size = checkpoint_bytes(path)
    on_disk = _stored_itemsize(path)
    need = size * torch.empty((), dtype=dtype).element_size() / on_disk * margin
    return need < psutil.virtual_memory().available


def _stored_itemsize(path: str | os.PathLike) -> int:
    """Bytes per element of the checkpoint's first floating tensor (2 for bf16/fp16, 4 for fp32)."""
    try:
        reader = CheckpointReader(path)
        for name in sorted(reader.keys()):
            t = reader.get(name)
            if t.is_floating_point():
                return t.element_size()
    except CheckpointError:
        pass
    return 4


def skeleton(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, CheckpointReader]:
    """The model at ``path`` (a Hugging Face directory or an llmdeploy save, safetensors weights)
    with everything outside the decoder blocks loaded and the blocks on ``meta``, and the reader
    its blocks are streamed from."""
    path = Path(path)
    reader = CheckpointReader(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} has no readable config.json: {e}") from e
    manifest = read_manifest(path) if (path / MANIFEST).exists() else {}
    with init_empty_weights(include_buffers=False):  # parameters on meta, computed buffers real
        if manifest.get("model_class"):
            model = _model_class(manifest, path)(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    model.to(dtype)
    for name, spec in manifest.get("modules", {}).items():
        cls = MODULES.get(spec.get("class"))
        if cls is None:
            raise CheckpointError(f"{path} uses module class {spec.get('class')!r}, unknown to this llmdeploy")
        with torch.device("meta"):
            model.set_submodule(name, cls(**spec["init"], dtype=dtype))
    adapter = get_adapter(model)
    prefix = adapter.blocks_prefix() + "."
    state = model.state_dict(keep_vars=True)
    outside = {}
    for name, ref in state.items():
        if name.startswith(prefix) or name not in reader.keys():
            continue
        t = reader.get(name)
        if t.is_floating_point() and ref.is_floating_point() and t.dtype != ref.dtype:
            t = t.to(ref.dtype)
        outside[name] = t
    model.load_state_dict(outside, strict=False, assign=True)
    reader.close()
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    for module in compressed_modules(model).values():
        module.bind(model)
    left = [n for n, t in model.state_dict(keep_vars=True).items() if not n.startswith(prefix) and t.is_meta]
    if left:
        raise CheckpointError(f"{path} lacks tensors outside the decoder blocks: {left[:3]}")
    model.eval()
    return model, reader


def _steps(recipe: Compressor | list[Compressor]) -> list[Compressor]:
    if isinstance(recipe, Compose):
        return list(recipe.steps)
    if isinstance(recipe, Compressor):
        return [recipe]
    return list(recipe)


def compress_streaming(
    source: str | os.PathLike,
    recipe: Compressor | list[Compressor],
    calib: torch.Tensor | None,
    output: str | os.PathLike,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float32,
    work_dir: str | os.PathLike | None = None,
    resume: bool = False,
    spill: bool = True,
) -> Path:
    """Apply ``recipe`` to the model at ``source`` one block at a time and save it to ``output``.

    ``source`` is a model directory with safetensors weights (Hugging Face or an llmdeploy save);
    every step must be streamable (GPTQ, RTN, magnitude/Wanda/SparseGPT/SparseLLM, SliceGPT).
    ``spill`` keeps the calibration activations on disk (in ``work_dir``) instead of in memory.
    Under ``torchrun`` every process runs this call; the calibration windows are shared among
    them and only rank 0 writes. Returns the output directory.
    """
    steps = _steps(recipe)
    for step in steps:
        if not step.streamable:
            raise ConfigError(f"{step.method or type(step).__name__} cannot run on streamed blocks; "
                              "streamable methods: " + ", ".join(sorted(
                                  {s.method for s in METHODS.values() if s.streamable})))
        if step.needs_calibration:
            check_calibration(calib, step.method)
    map_large_allocations()
    src = Path(source).expanduser().resolve()
    out = Path(output).expanduser().resolve()
    work = Path(work_dir).expanduser().resolve() if work_dir is not None else out.parent / f".{out.name}.stream"
    run = {"source": str(src), "recipe": [s.to_dict() for s in steps], "dtype": str(dtype),
           "calib": None if calib is None else hashlib.sha256(calib.cpu().contiguous().numpy().tobytes()).hexdigest()}
    run = json.loads(json.dumps(run, default=str))
    if is_main():
        if resume and (work / "run.json").exists() and json.loads((work / "run.json").read_text()) != run:
            raise CheckpointError(f"{work} holds the progress of a different run (other recipe, source or calibration "
                                  "data); delete it or run without resume")
        if not resume:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        (work / "run.json").write_text(json.dumps(run))
    barrier()
    tok = _tokenizer(src, tokenizer) if tokenizer is not None or _has_tokenizer(src) else None
    for k, step in enumerate(steps):
        last = k == len(steps) - 1
        dst = out if last else work / f"step{k}-{step.method}"
        if resume and not last and (dst / MANIFEST).exists():
            log.info("streaming: step %d (%s) finished earlier; reading %s", k, step.method, dst)
            src = dst
            continue
        model, reader = skeleton(src, dtype=dtype)
        prefix = get_adapter(model).blocks_prefix()
        n_blocks = len(get_adapter(model).blocks())
        partial = work / f"step{k}-{step.method}.blocks"
        writer = ShardWriter(partial, fresh=not resume) if is_main() else None
        barrier()
        stream = BlockStream(reader, writer, prefix)
        log.info("streaming %s over %d blocks of %s", step.method, n_blocks, src)
        with engine_options(model, stream=stream, spill_dir=str(work / "spill") if spill else None,
                            checkpoint_dir=str(work / f"step{k}-{step.method}.walk"), resume=resume):
            model = step(model, calib)
        if writer is not None:
            written = writer.written()
            missing = sorted(set(range(n_blocks)) - set(written))
            if missing:
                raise ConfigError(f"{step.method} left blocks {missing[:5]} unwritten: it does not walk every "
                                  "block through the engine")
            save(model, tok, dst, weights=lambda m, folder, w=written, p=partial, x=prefix: _write_weights(m, folder, w, p, x),
                 modules={n: spec for rec in written.values() for n, spec in rec["modules"].items()})
        barrier()
        src = dst
    if is_main():
        shutil.rmtree(work, ignore_errors=True)
    return out


def _write_weights(model: torch.nn.Module, folder: Path, written: dict[int, dict[str, Any]], partial: Path,
                   prefix: str) -> dict[str, Any]:
    """Put the finished blocks' files into ``folder`` (hard links where the file system allows),
    write everything outside the blocks to ``rest.safetensors`` and the index naming every
    tensor's file; return the manifest's ``weights`` entry."""
    weight_map: dict[str, str] = {}
    total = 0
    for rec in written.values():
        target = folder / rec["file"]
        try:
            os.link(partial / rec["file"], target)
        except OSError:
            shutil.copyfile(partial / rec["file"], target)
        for key in rec["keys"]:
            weight_map[key] = rec["file"]
    rest: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, t in model.state_dict().items():
        if name.startswith(prefix + "."):
            continue
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if ptr in seen:  # tied (the head sharing the embedding): stored once, as the loaders expect
            continue
        seen.add(ptr)
        rest[name] = t.detach().cpu()
    write_safetensors(folder / REST, rest, metadata={"format": "pt"})
    for key in rest:
        weight_map[key] = REST
    files = sorted(set(weight_map.values()))
    for f in files:
        total += (folder / f).stat().st_size
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return {"index": INDEX, "files": {f: sha256_file(folder / f) for f in files}}
