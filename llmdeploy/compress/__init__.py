"""Composable compressors, the shared block-wise calibration engine, compressed-module base."""

from .base import Compose, Compressor, applied_recipe, get_method, methods, register_method
from .engine import BlockContext, run_blockwise
from .modules import CompressedModule, compressed_modules, register_module

__all__ = [
    "BlockContext",
    "Compose",
    "CompressedModule",
    "Compressor",
    "applied_recipe",
    "compressed_modules",
    "get_method",
    "methods",
    "register_method",
    "register_module",
    "run_blockwise",
]
