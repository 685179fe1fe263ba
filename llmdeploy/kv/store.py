"""Physical storage of KV blocks: one pool per layer, optionally quantized.

A :class:`BlockStore` knows nothing about sequences; it writes tokens to ``(block, offset)``
slots and reads whole blocks back through a block table. The same class backs the single-process
paged cache and every rank of DistAttention, where it also answers attention queries over the
blocks it holds (:meth:`BlockStore.attend`). Pools are created lazily at the first write of each
layer, from the shapes the model produces, so the store needs no architecture knowledge.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .attention import partial_attention
from .quant import KVQuantConfig, dequantize, quantize


class _Pool:
    """One layer's keys or values: codes (or raw values) and, when quantized, scales and zeros."""

    def __init__(self, n_blocks: int, heads: int, block_size: int, dim: int, dtype: torch.dtype,
                 bits: int | None, axis: str, device):
        self.bits, self.axis, self.dtype = bits, axis, dtype
        self.block_size = block_size
        if bits is None:
            self.data = torch.zeros(n_blocks, heads, block_size, dim, dtype=dtype, device=device)
            self.scale = self.zero = None
        else:
            packed = dim // 2 if bits == 4 else dim
            self.data = torch.zeros(n_blocks, heads, block_size, packed, dtype=torch.uint8, device=device)
            shape = (n_blocks, heads, block_size, 1) if axis == "token" else (n_blocks, heads, 1, dim)
            self.scale = torch.zeros(shape, dtype=torch.float32, device=device)
            self.zero = torch.zeros(shape, dtype=torch.float32, device=device)
        # per-channel: full-precision copy of each block that is still being filled
        self.tails: dict[int, torch.Tensor] = {}
        self.shape = (heads, block_size, dim)

    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        if self.scale is not None:
            n += 2 * self.scale.numel() * self.scale.element_size()
        return n + sum(t.numel() * t.element_size() for t in self.tails.values())

    def write(self, blocks: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor) -> None:
        """Store ``x`` (N, heads, dim) at slots ``(blocks[i], offsets[i])``."""
        if self.bits is None:
            self.data[blocks, :, offsets] = x.to(self.dtype)
        elif self.axis == "token":
            q, s, z = quantize(x.float(), self.bits, dim=-1)
            self.data[blocks, :, offsets] = q
            self.scale[blocks, :, offsets] = s
            self.zero[blocks, :, offsets] = z
        else:
            for b in torch.unique(blocks).tolist():
                sel = blocks == b
                tail = self.tails.get(b)
                if tail is None:
                    tail = self.tails[b] = torch.zeros(self.shape, dtype=torch.float32, device=x.device)
                    tail.fill_(float("nan"))  # slots not written yet
                tail[:, offsets[sel]] = x[sel].float().transpose(0, 1)
                if not torch.isnan(tail).any():  # the block is full: quantize it, drop the copy
                    q, s, z = quantize(tail, self.bits, dim=-2)
                    self.data[b], self.scale[b], self.zero[b] = q, s, z
                    del self.tails[b]

    def read(self, table: torch.Tensor) -> torch.Tensor:
        """The blocks of ``table`` (B, nb) as (B, heads, nb * block_size, dim) in ``dtype``."""
        B, nb = table.shape
        if self.bits is None:
            x = self.data[table]
        else:
            x = dequantize(self.data[table], self.scale[table], self.zero[table], self.bits, self.dtype)
            for b, tail in self.tails.items():
                rows, cols = (table == b).nonzero(as_tuple=True)
                if rows.numel():
                    x[rows, cols] = torch.nan_to_num(tail, nan=0.0).to(self.dtype)
        heads, bs, dim = self.shape
        return x.transpose(1, 2).reshape(B, heads, nb * bs, dim)

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.tails.pop(b, None)


class BlockStore:
    """KV pools of ``n_blocks`` blocks of ``block_size`` tokens for every layer."""

    def __init__(self, n_blocks: int, block_size: int, *, quant: KVQuantConfig | None = None,
                 dtype: torch.dtype | None = None, device=None):
        self.n_blocks, self.block_size, self.quant = n_blocks, block_size, quant
        self.dtype, self.device = dtype, device
        self.keys: dict[int, _Pool] = {}
        self.values: dict[int, _Pool] = {}

    def _init_layer(self, layer: int, k: torch.Tensor) -> None:
        dtype = self.dtype or k.dtype
        heads, dim = k.shape[-2], k.shape[-1]
        q = self.quant
        if q is not None and q.bits == 4 and dim % 2:
            raise ConfigError(f"4-bit KV needs an even head dimension, got {dim}")
        for pools, axis in ((self.keys, q and q.key_axis), (self.values, q and q.value_axis)):
            pools[layer] = _Pool(self.n_blocks, heads, self.block_size, dim, dtype,
                                 q.bits if q else None, axis or "token", self.device or k.device)

    def write(self, layer: int, blocks: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Keys and values (N, heads, dim) of N tokens into their slots."""
        if layer not in self.keys:
            self._init_layer(layer, k)
        self.keys[layer].write(blocks, offsets, k)
        self.values[layer].write(blocks, offsets, v)

    def read(self, layer: int, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer].read(table), self.values[layer].read(table)

    def attend(self, layer: int, q: torch.Tensor, q_pos: torch.Tensor, table: torch.Tensor,
               k_pos: torch.Tensor, k_valid: torch.Tensor, scale: float):
        """Partial attention of ``q`` (B, H, Tq, D) over the blocks of ``table`` (B, nb), whose
        slots have positions ``k_pos`` and validity ``k_valid`` (B, nb * block_size)."""
        k, v = self.read(layer, table)
        return partial_attention(q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos, k_valid=k_valid)

    def release(self, blocks: list[int]) -> None:
        for pools in (self.keys, self.values):
            for pool in pools.values():
                pool.release(blocks)

    def nbytes(self) -> int:
        return sum(p.nbytes() for pools in (self.keys, self.values) for p in pools.values())

    def bytes_per_token(self) -> float:
        """Storage per cached token over all layers (pools' bytes / capacity), tails excluded."""
        total = 0
        for pools in (self.keys, self.values):
            for p in pools.values():
                n = p.data.numel() * p.data.element_size()
                if p.scale is not None:
                    n += 2 * p.scale.numel() * p.scale.element_size()
                total += n
        return total / (self.n_blocks * self.block_size)
