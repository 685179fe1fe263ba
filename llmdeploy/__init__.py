"""llmdeploy: compress, evaluate and deploy large language models.

>>> import llmdeploy
>>> model, tok = llmdeploy.load("tiny-llama")
>>> model = llmdeploy.quant.RTN(bits=4, group_size=32)(model)
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

from . import compress, data, distill, eval, finetune, io, prune, quant, recipe  # noqa: E402
from .compress import Compose, Compressor, applied_recipe  # noqa: E402
from .io import ZOO, compress_streaming, load, save  # noqa: E402
from .models import get_adapter  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "ZOO",
    "Compose",
    "Compressor",
    "__version__",
    "applied_recipe",
    "compress",
    "compress_streaming",
    "data",
    "distill",
    "eval",
    "finetune",
    "get_adapter",
    "io",
    "load",
    "prune",
    "quant",
    "recipe",
    "save",
]
