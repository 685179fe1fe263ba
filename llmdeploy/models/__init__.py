"""Model loading, the zoo, architecture adapters and checkpoints."""

from .adapters import (
    LinearSpec,
    LlamaAdapter,
    ModelAdapter,
    OPTAdapter,
    get_adapter,
    register_adapter,
    supported_model_types,
)
from .checkpoint import load_saved, read_manifest, save
from .loading import load, load_gguf
from .tokenizer import byte_level_tokenizer
from .zoo import ZOO

__all__ = [
    "ZOO",
    "LinearSpec",
    "LlamaAdapter",
    "ModelAdapter",
    "OPTAdapter",
    "byte_level_tokenizer",
    "get_adapter",
    "load",
    "load_gguf",
    "load_saved",
    "read_manifest",
    "register_adapter",
    "save",
    "supported_model_types",
]
