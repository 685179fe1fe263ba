"""Fine-tunes stored as deltas over a shared base: BitDelta and its multi-tenant serving."""

from .baselines import LowRankDelta, RTNDelta
from .bitdelta import BitDelta, BitDeltaEmbedding, BitDeltaLinear, model_hash, shallow_clone
from .serving import MultiTenant, load_delta, save_delta

__all__ = ["BitDelta", "BitDeltaEmbedding", "BitDeltaLinear", "LowRankDelta", "MultiTenant", "RTNDelta", "load_delta", "model_hash", "save_delta", "shallow_clone"]
