"""Quantization methods: additive codebooks (AQLM) and scalar baselines (RTN, dynamic int8, mixed
precision through RTN overrides)."""

from .aqlm import AQLM, beam_search_codes, quantize_layer
from .aqlm_linear import AQLMLinear
from .dynamic_int8 import DynamicInt8, DynamicInt8Linear
from .packing import pack, unpack
from .rtn import RTN, RTNLinear, dequantize_groupwise, quantize_groupwise

__all__ = [
    "AQLM",
    "RTN",
    "AQLMLinear",
    "DynamicInt8",
    "DynamicInt8Linear",
    "RTNLinear",
    "beam_search_codes",
    "dequantize_groupwise",
    "pack",
    "quantize_groupwise",
    "quantize_layer",
    "unpack",
]
