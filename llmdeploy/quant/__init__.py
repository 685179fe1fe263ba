"""Quantization methods: scalar baselines (RTN, dynamic int8, mixed precision through RTN overrides)."""

from .dynamic_int8 import DynamicInt8, DynamicInt8Linear
from .packing import pack, unpack
from .rtn import RTN, RTNLinear, dequantize_groupwise, quantize_groupwise

__all__ = [
    "RTN",
    "DynamicInt8",
    "DynamicInt8Linear",
    "RTNLinear",
    "dequantize_groupwise",
    "pack",
    "quantize_groupwise",
    "unpack",
]
