"""Block allocation for a paged KV cache: a free list of fixed-size blocks and a block table per
sequence (vLLM's design; DistKV-LLM's rBlocks).

Every block is owned by at most one sequence; a sequence's table lists its blocks in token order,
so token ``t`` of a sequence lives in ``table[t // block_size]`` at offset ``t % block_size``.
Allocation is all-or-nothing: a request that does not fit raises :class:`KVCacheFullError` and
changes nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

from ..errors import ConfigError, KVCacheFullError


class BlockAllocator:
    """Free list over ``num_blocks`` physical blocks with an owner per allocated block."""

    def __init__(self, num_blocks: int):
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ConfigError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._owner: dict[int, Hashable] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def owner(self, block: int) -> Hashable | None:
        return self._owner.get(block)

    def allocate(self, seq: Hashable, n: int) -> list[int]:
        """``n`` blocks for ``seq``, or :class:`KVCacheFullError` (nothing allocated)."""
        if n > len(self._free):
            raise KVCacheFullError(
                f"{n} KV block(s) needed for sequence {seq!r} but only {len(self._free)} of "
                f"{self.num_blocks} are free: raise num_blocks or free finished sequences")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._owner[b] = seq
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Return ``blocks`` to the free list; freeing a block that is not allocated is a bug."""
        for b in blocks:
            if b not in self._owner:
                raise RuntimeError(f"block {b} freed twice or never allocated")
            del self._owner[b]
            self._free.append(b)

    def check(self) -> None:
        """Assert the invariants: every block is either free or owned, never both, never twice."""
        free = list(self._free)
        assert len(free) == len(set(free)), "a block is on the free list twice"
        assert not set(free) & set(self._owner), "a block is both free and owned"
        assert len(free) + len(self._owner) == self.num_blocks, "a block was lost"


class BlockTables:
    """Per-sequence block tables and lengths over one :class:`BlockAllocator`.

    Blocks are ``(location, block)`` pairs: ``location`` is the rank that holds the block (``0``
    on a single process). ``allocator_for(n)`` decides where new blocks come from; the default is
    the local allocator only.
    """

    def __init__(self, allocator: BlockAllocator, block_size: int):
        if not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"block_size must be a positive int, got {block_size!r}")
        self.allocator = allocator
        self.block_size = block_size
        self.tables: dict[Hashable, list[tuple[int, int]]] = {}
        self.lengths: dict[Hashable, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks that can still be given to sequences (local and, for DistAttention, lendable)."""
        return self.allocator.num_free

    @property
    def capacity(self) -> int:
        return self.allocator.num_blocks

    def add(self, seq: Hashable) -> None:
        if seq in self.tables:
            raise ConfigError(f"sequence {seq!r} is already in the cache")
        self.tables[seq] = []
        self.lengths[seq] = 0

    def blocks_needed(self, seq: Hashable, n_new: int) -> int:
        have = len(self.tables[seq])
        need = -(-(self.lengths[seq] + n_new) // self.block_size)
        return max(0, need - have)

    def grow(self, seq: Hashable, n_new: int) -> list[tuple[int, int]]:
        """Make room for ``n_new`` more tokens of ``seq``; returns the ``(location, block, offset)``
        slot of each new token. Raises :class:`KVCacheFullError` with nothing changed."""
        if seq not in self.tables:
            raise ConfigError(f"unknown sequence {seq!r}: add it to the cache first")
        need = self.blocks_needed(seq, n_new)
        if need:
            self.tables[seq].extend(self._take(seq, need))
        start = self.lengths[seq]
        self.lengths[seq] = start + n_new
        table = self.tables[seq]
        bs = self.block_size
        return [(*table[t // bs], t % bs) for t in range(start, start + n_new)]

    def _take(self, seq: Hashable, n: int) -> list[tuple[int, int]]:
        return [(0, b) for b in self.allocator.allocate(seq, n)]

    def _release(self, seq: Hashable, blocks: list[tuple[int, int]]) -> None:
        self.allocator.free([b for _, b in blocks])

    def truncate(self, seq: Hashable, length: int) -> list[tuple[int, int]]:
        """Shorten ``seq`` to its first ``length`` tokens; blocks no longer needed are freed and
        returned (speculative decoding drops the rejected drafts this way)."""
        if not 0 <= length <= self.lengths[seq]:
            raise ConfigError(f"cannot truncate sequence {seq!r} of {self.lengths[seq]} tokens to {length}")
        keep = -(-length // self.block_size)
        table = self.tables[seq]
        dropped = table[keep:]
        del table[keep:]
        self.lengths[seq] = length
        if dropped:
            self._release(seq, dropped)
        return dropped

    def remove(self, seq: Hashable) -> list[tuple[int, int]]:
        """Free every block of ``seq`` (finished or cancelled) and forget it."""
        blocks = self.tables.pop(seq)
        self.lengths.pop(seq)
        self._release(seq, blocks)
        return blocks
