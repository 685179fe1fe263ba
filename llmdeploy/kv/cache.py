"""A paged KV cache that transformers models use as their ``Cache``.

Keys and values live in fixed-size blocks of a :class:`~llmdeploy.kv.store.BlockStore`; each
sequence owns a block table. Two ways to drive it:

- **As a drop-in cache** (``model.generate(..., past_key_values=cache)`` or
  ``model(ids, past_key_values=cache)``): the batch rows become sequences ``0..B-1`` at the
  first forward and every forward appends its tokens to each row, exactly like transformers'
  ``DynamicCache`` (padding is the caller's mask, as usual).
- **Ragged batches** (what :func:`llmdeploy.kv.generate` does): :meth:`PagedKVCache.prepare`
  names the sequences of the next forward and how many new tokens each brings (right-padded
  input), allocates their slots, and returns the position ids and the 4-D attention mask that make
  every row see only its own tokens; sequences join and leave between forwards, and
  :meth:`PagedKVCache.free` returns a finished or cancelled sequence's blocks at once.

Reads gather a row's blocks into a contiguous tensor for the model's own attention (eager, SDPA
...), so any architecture with a transformers attention works unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..errors import ConfigError, KVCacheFullError
from .blocks import BlockAllocator, BlockTables
from .quant import KVQuantConfig
from .store import BlockStore


@dataclass
class StepPlan:
    """Where the tokens of one forward go: for batch row ``r`` its first ``n_new[r]`` inputs."""

    seqs: list[Hashable]
    n_new: list[int]
    start: list[int]  # length of each sequence before this step
    write_rows: torch.Tensor  # (N,) batch row of each real new token
    write_cols: torch.Tensor  # (N,) its column in the input
    write_blocks: torch.Tensor  # (N,) physical block
    write_locs: torch.Tensor  # (N,) rank holding the block (0 on one process)
    write_offsets: torch.Tensor  # (N,) offset in the block
    table: torch.Tensor  # (B, nb) padded block ids
    table_locs: torch.Tensor  # (B, nb) rank of each block (-1 = padding)
    lengths: torch.Tensor  # (B,) length after this step

    @property
    def max_len(self) -> int:
        return int(self.lengths.max())


class PagedLayer(CacheLayerMixin):
    """One layer's view of a cache that keeps every layer's storage itself (what transformers'
    ``Cache`` iterates): each call goes to the owning cache with this layer's index. Used by the
    paged cache and by :class:`llmdeploy.decode.TreeCache`."""

    is_compileable = False
    is_sliding = False

    def __init__(self, cache: Cache, layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # pools are made by the store
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self.cache.update(key_states, value_states, self.layer_idx)

    def get_seq_length(self) -> int:
        return self.cache.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.cache.reset()


class PagedKVCache(Cache):
    """Paged KV cache of ``num_blocks`` blocks of ``block_size`` tokens (per layer), optionally
    quantized (``quant=KVQuantConfig(bits=8)``)."""

    needs_mask = True  # the model's own attention reads gathered blocks through a 4-D mask

    def __init__(self, num_blocks: int, block_size: int = 16, *, quant: KVQuantConfig | None = None,
                 dtype: torch.dtype | None = None, device=None):
        if quant is not None and not isinstance(quant, KVQuantConfig):
            raise ConfigError(f"quant must be a KVQuantConfig or None, got {type(quant).__name__}")
        super().__init__(layers=[])
        self.block_size = block_size
        self.quant = quant
        self.store = BlockStore(num_blocks, block_size, quant=quant, dtype=dtype, device=device)
        self.blocks = self._make_tables(num_blocks, block_size)
        self._plan: StepPlan | None = None
        self._prepared = False
        self._auto: list[int] | None = None  # sequences made for drop-in use

    def _make_tables(self, num_blocks: int, block_size: int) -> BlockTables:
        return BlockTables(BlockAllocator(num_blocks), block_size)

    # --- sequences -------------------------------------------------------------------------
    def add(self, seq: Hashable) -> None:
        """Register a new, empty sequence."""
        self.blocks.add(seq)

    def free(self, seq: Hashable) -> None:
        """Return every block of ``seq`` (finished or cancelled) to the free list."""
        released = self.blocks.remove(seq)
        self._release(released)

    def _release(self, released: list[tuple[int, int]]) -> None:
        self.store.release([b for loc, b in released if loc == 0])

    #: whether :meth:`truncate` works (not with DistAttention's lent blocks)
    supports_truncate = True

    def truncate(self, seq: Hashable, length: int) -> None:
        """Keep only the first ``length`` tokens of ``seq`` (later writes overwrite the rest);
        freed blocks return to the pool. Not with per-channel KV quantization, whose blocks are
        quantized once full and cannot be partly rewritten."""
        if not self.supports_truncate:
            raise ConfigError(f"{type(self).__name__} cannot drop tokens (speculative decoding): use PagedKVCache")
        q = self.quant
        if q is not None and "channel" in (q.key_axis, q.value_axis):
            raise ConfigError("a KV cache quantized per channel cannot drop tokens (speculative decoding): "
                              "quantize per token or not at all")
        self._release(self.blocks.truncate(seq, length))

    def length(self, seq: Hashable) -> int:
        return self.blocks.lengths[seq]

    @property
    def sequences(self) -> list[Hashable]:
        return list(self.blocks.tables)

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    def can_fit(self, seqs: Sequence[Hashable], n_new: Sequence[int]) -> bool:
        return sum(self.blocks.blocks_needed(s, n) for s, n in zip(seqs, n_new)) <= self.num_free_blocks

    # --- one forward -----------------------------------------------------------------------
    def prepare(self, seqs: Sequence[Hashable], n_new: Sequence[int], device=None,
                dtype: torch.dtype = torch.float32, mask: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Allocate the slots of the next forward, whose batch row ``r`` carries ``n_new[r]``
        real tokens of ``seqs[r]`` (right-padded to ``max(n_new)``). Returns ``position_ids``
        (B, T) and an additive 4-D attention mask (B, 1, T, max length) to pass to the model
        (``None`` with ``mask=False``, for attention implementations that mask by position).
        Allocation is all-or-nothing (:class:`KVCacheFullError` leaves every table unchanged)."""
        seqs, n_new = list(seqs), [int(n) for n in n_new]
        if len(seqs) != len(n_new) or not seqs:
            raise ConfigError("prepare() needs one n_new per sequence and at least one sequence")
        if len(set(seqs)) != len(seqs):
            raise ConfigError("a sequence appears twice in one forward")
        for s in seqs:
            if s not in self.blocks.tables:
                raise ConfigError(f"unknown sequence {s!r}: add() it first")
        self._plan = self._grow(seqs, n_new)
        self._prepared = True
        start = self._plan.start
        T = max(n_new)
        pos = torch.tensor(start)[:, None] + torch.arange(T)[None, :]
        L = self._plan.max_len
        kpos = torch.arange(L)
        if not mask:
            return pos.to(device), None
        visible = (kpos[None, None, :] <= pos[:, :, None]) & (kpos[None, None, :] < self._plan.lengths[:, None, None])
        mask = torch.zeros(visible.shape, dtype=dtype)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        return pos.to(device), mask[:, None].to(device)

    def _grow(self, seqs: list[Hashable], n_new: list[int]) -> StepPlan:
        """Reserve (all or nothing), then allocate the slots of ``n_new[r]`` tokens per sequence."""
        self._reserve(seqs, n_new)
        start = [self.blocks.lengths[s] for s in seqs]
        slots, rows, cols = [], [], []
        for r, (s, n) in enumerate(zip(seqs, n_new)):
            slots.extend(self.blocks.grow(s, n))
            rows.extend([r] * n)
            cols.extend(range(n))
        return self._make_plan(seqs, n_new, start, slots, rows, cols)

    def _reserve(self, seqs: list[Hashable], n_new: list[int]) -> None:
        need = sum(self.blocks.blocks_needed(s, n) for s, n in zip(seqs, n_new))
        if need > self.num_free_blocks:
            raise KVCacheFullError(f"this step needs {need} new KV block(s) but {self.num_free_blocks} are free: "
                                   "raise num_blocks, lower the batch, or free finished sequences")

    def _make_plan(self, seqs, n_new, start, slots, rows, cols) -> StepPlan:
        nb = max(len(self.blocks.tables[s]) for s in seqs)
        table = torch.zeros(len(seqs), nb, dtype=torch.long)
        locs = torch.full((len(seqs), nb), -1, dtype=torch.long)
        for r, s in enumerate(seqs):
            t = self.blocks.tables[s]
            if t:
                table[r, : len(t)] = torch.tensor([b for _, b in t])
                locs[r, : len(t)] = torch.tensor([loc for loc, _ in t])
        slot = torch.tensor(slots, dtype=torch.long).reshape(-1, 3)
        return StepPlan(
            seqs=seqs, n_new=n_new, start=start,
            write_rows=torch.tensor(rows, dtype=torch.long), write_cols=torch.tensor(cols, dtype=torch.long),
            write_locs=slot[:, 0], write_blocks=slot[:, 1], write_offsets=slot[:, 2],
            table=table, table_locs=locs,
            lengths=torch.tensor([s + n for s, n in zip(start, n_new)]),
        )

    def _auto_plan(self, batch: int, T: int) -> None:
        """Drop-in use: rows are sequences 0..B-1, each advancing by ``T`` tokens."""
        if self._auto is None:
            self._auto = list(range(batch))
            for s in self._auto:
                self.add(s)
        elif len(self._auto) != batch:
            raise ConfigError(f"the cache holds {len(self._auto)} rows but the batch has {batch}: "
                              "use a new cache for a new batch")
        self._plan = self._grow(self._auto, [T] * batch)

    def _begin_layer(self, layer_idx: int, key_states: torch.Tensor) -> StepPlan:
        while len(self.layers) <= layer_idx:
            self.layers.append(PagedLayer(self, len(self.layers)))
        if layer_idx == 0:
            if self._prepared:
                self._prepared = False
            else:
                self._auto_plan(key_states.shape[0], key_states.shape[2])
        plan = self._plan
        if plan is None:
            raise ConfigError("the paged cache got layer updates before the first layer's")
        if key_states.shape[0] != len(plan.seqs) or key_states.shape[2] != max(plan.n_new):
            raise ConfigError(f"the forward's keys have shape {tuple(key_states.shape)} but prepare() was told "
                              f"{len(plan.seqs)} rows of up to {max(plan.n_new)} tokens")
        return plan

    def _update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        plan = self._begin_layer(layer_idx, key_states)
        k = key_states[plan.write_rows, :, plan.write_cols]  # (N, Hkv, D)
        v = value_states[plan.write_rows, :, plan.write_cols]
        dev = key_states.device
        self.store.write(layer_idx, plan.write_blocks.to(dev), plan.write_offsets.to(dev), k, v)
        keys, values = self.store.read(layer_idx, plan.table.to(dev))
        L = plan.max_len
        return keys[:, :, :L].to(key_states.dtype), values[:, :, :L].to(value_states.dtype)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self._update(key_states, value_states, layer_idx)

    # --- what transformers asks ------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self._prepared and self._plan is not None:
            return max(self._plan.start)
        seqs = self._auto if self._auto is not None else list(self.blocks.lengths)
        return max((self.blocks.lengths[s] for s in seqs), default=0)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def _unsupported(self, what: str):
        raise ConfigError(f"the paged KV cache does not support {what} (beam search, assisted decoding); "
                          "use greedy or sampled generation, or transformers' default cache")

    def reorder_cache(self, beam_idx) -> None:
        self._unsupported("reordering rows")

    def crop(self, tokens_to_remove: int) -> None:
        self._unsupported("cropping")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unsupported("repeating rows")

    def batch_select_indices(self, indices) -> None:
        self._unsupported("selecting rows")

    def reset(self) -> None:
        for s in list(self.blocks.tables):
            self.free(s)
        self._auto, self._plan, self._prepared = None, None, False

    def attach(self, model):
        """Context in which ``model`` runs on this cache; the paged cache needs nothing, the
        distributed one switches the model's attention to DistAttention."""
        return contextlib.nullcontext(model)

    # --- memory ------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes held by the KV pools (codes, scales, and per-channel full-precision tails)."""
        return self.store.nbytes()

    def bytes_per_token(self) -> float:
        return self.store.bytes_per_token()
