"""KV cache for serving: paged blocks, KV quantization, split-KV attention and DistAttention.

- :class:`PagedKVCache`: a transformers ``Cache`` whose keys and values live in fixed-size
  blocks with a block table per sequence (:mod:`.blocks`, :mod:`.store`), optionally quantized
  (:class:`KVQuantConfig`, :mod:`.quant`).
- :class:`PagedEngine` / :func:`generate`: continuous batching over it (:mod:`.engine`).
- :func:`partial_attention` / :func:`merge_partials`: attention over a subset of blocks and the
  exact online-softmax merge (:mod:`.attention`).
- :mod:`.distributed`: DistAttention across ``torch.distributed`` processes (DistKV-LLM).
"""

from .attention import merge_partials, partial_attention
from .blocks import BlockAllocator, BlockTables
from .cache import PagedKVCache
from .engine import PagedEngine, generate
from .quant import KVQuantConfig
from .store import BlockStore

__all__ = [
    "BlockAllocator", "BlockStore", "BlockTables", "KVQuantConfig", "PagedEngine", "PagedKVCache",
    "generate", "merge_partials", "partial_attention",
]
