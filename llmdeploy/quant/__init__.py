"""Quantization methods: additive codebooks (AQLM), GPTQ, PV-Tuning of either, and scalar baselines (RTN, dynamic int8,
mixed precision through RTN overrides)."""

from .aqlm import AQLM, beam_search_codes, quantize_layer
from .aqlm_linear import AQLMLinear
from .dynamic_int8 import DynamicInt8, DynamicInt8Linear
from .embedding import EmbeddingRTN, RTNEmbedding, RTNTiedHead
from .gptq import GPTQ, gptq_hinv, gptq_quantize, layer_error
from .packing import pack, unpack
from .pv_tuning import PVTuning
from .rtn import RTN, RTNLinear, dequantize_groupwise, quantize_groupwise

__all__ = [
    "AQLM",
    "GPTQ",
    "PVTuning",
    "RTN",
    "AQLMLinear",
    "DynamicInt8",
    "DynamicInt8Linear",
    "EmbeddingRTN",
    "RTNEmbedding",
    "RTNTiedHead",
    "RTNLinear",
    "beam_search_codes",
    "dequantize_groupwise",
    "gptq_hinv",
    "gptq_quantize",
    "layer_error",
    "pack",
    "quantize_groupwise",
    "quantize_layer",
    "unpack",
]
