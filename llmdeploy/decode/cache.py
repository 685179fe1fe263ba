"""A KV cache for tree verification: per-row lengths, writes at each row's end, compaction.

Each row ``b`` holds ``lengths[b]`` committed tokens in slots ``0..lengths[b]-1`` of a contiguous
(B, heads, capacity, dim) buffer per layer. A forward of ``T`` tree nodes writes node ``i`` of row
``b`` at slot ``lengths[b] + i`` (rows of different lengths and acceptance stay ragged; the 4-D
mask of :func:`~llmdeploy.decode.tree.tree_inputs` hides everything else), and
:meth:`TreeCache.commit` then moves each row's accepted nodes to the front of its tail, in order,
so the cache equals the cache of plain decoding of the accepted tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache

from ..errors import ConfigError
from ..kv.cache import PagedLayer


class TreeCache(Cache):
    """Ragged per-row KV cache (see the module docstring) that transformers models take as their
    cache; buffers grow by doubling."""

    def __init__(self, batch: int, capacity: int = 256) -> None:
        super().__init__(layers=[])
        self.lengths = torch.zeros(batch, dtype=torch.long)
        self.capacity = capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._T = 0

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def _grow(self, need: int) -> None:
        if need <= self.capacity:
            return
        cap = self.capacity
        while cap < need:
            cap *= 2
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                new = t.new_zeros(t.shape[0], t.shape[1], cap, t.shape[3])
                new[:, :, : t.shape[2]] = t
                store[i] = new
        self.capacity = cap

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        B, H, T, D = key_states.shape
        if B != self.batch:
            raise ConfigError(f"the forward has {B} rows but the cache holds {self.batch}")
        while len(self.layers) <= layer_idx:
            self.layers.append(PagedLayer(self, len(self.layers)))
        self._grow(int(self.lengths.max()) + T)
        if len(self.keys) <= layer_idx:
            shape = (B, H, self.capacity, D)
            self.keys.append(key_states.new_zeros(shape))
            self.values.append(value_states.new_zeros(shape))
        self._T = T
        k, v = self.keys[layer_idx], self.values[layer_idx]
        lo, hi = int(self.lengths.min()), int(self.lengths.max())
        if lo == hi:  # every row at the same length: a plain slice
            k[:, :, lo : lo + T] = key_states
            v[:, :, lo : lo + T] = value_states
        else:
            dev = key_states.device
            slots = self.lengths.to(dev)[:, None] + torch.arange(T, device=dev)[None, :]  # (B, T)
            idx = slots[:, None, :, None].expand(B, H, T, D)
            k.scatter_(2, idx, key_states.to(k.dtype))
            v.scatter_(2, idx, value_states.to(v.dtype))
        L = hi + T
        return k[:, :, :L], v[:, :, :L]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.lengths.max()) if self.batch else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def commit(self, keep: Sequence[Sequence[int]]) -> None:
        """After a forward, keep for row ``b`` the nodes ``keep[b]`` (indices into that forward's
        inputs, increasing) as its next committed tokens, in that order; the rest is dropped."""
        if len(keep) != self.batch:
            raise ConfigError(f"commit() needs one list per row ({self.batch}), got {len(keep)}")
        for b, nodes in enumerate(keep):
            nodes = list(nodes)
            if any(n >= self._T or n < 0 for n in nodes):
                raise ConfigError(f"row {b} keeps nodes {nodes} of a forward of {self._T}")
            start = int(self.lengths[b])
            if nodes != list(range(len(nodes))):  # move the accepted slots down, in order
                src = torch.tensor(nodes) + start
                dst = torch.arange(len(nodes)) + start
                for store in (self.keys, self.values):
                    for t in store:
                        t[b, :, dst.to(t.device)] = t[b, :, src.to(t.device)]
            self.lengths[b] = start + len(nodes)

    def select(self, rows: Sequence[int]) -> None:
        """Keep only batch rows ``rows`` (finished rows leave the batch)."""
        idx = torch.tensor(list(rows), dtype=torch.long)
        self.lengths = self.lengths[idx]
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                store[i] = t[idx.to(t.device)]

    def row(self, b: int, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ``b``'s committed keys and values at one layer, (heads, length, dim)."""
        n = int(self.lengths[b])
        return self.keys[layer_idx][b, :, :n], self.values[layer_idx][b, :, :n]

    def reset(self) -> None:
        self.lengths.zero_()
