"""Architecture adapters (the one place that knows model families) and the byte-level tokenizer
of the tiny test models: the bottom layer, imported by everything else. Loading, saving and the
zoo live in :mod:`llmdeploy.io`."""

from .adapters import (
    LinearSpec,
    LlamaAdapter,
    ModelAdapter,
    OPTAdapter,
    get_adapter,
    register_adapter,
    supported_model_types,
)
from .tokenizer import byte_level_tokenizer

__all__ = [
    "LinearSpec",
    "LlamaAdapter",
    "ModelAdapter",
    "OPTAdapter",
    "byte_level_tokenizer",
    "get_adapter",
    "register_adapter",
    "supported_model_types",
]
