"""DistAttention across ``torch.distributed`` processes (DistKV-LLM, Lin et al., 2024).

Rank 0 runs the model; every rank holds a budget of KV blocks. When rank 0's own blocks are
exhausted, its sequences borrow blocks on other ranks: the global manager (:class:`GManager`, on
rank 0) tracks each rank's free blocks and picks the lender with the most; the lender's local
manager (:class:`RManager`) allocates them and keeps, per sequence, which of its physical blocks
hold which logical block. New keys and values are written where their block lives. For every
layer, attention runs as split-KV attention: rank 0 computes the partial over its own blocks,
sends the *query* (and each row's sequence id, length and positions) to every rank that holds
blocks of that row, gets back ``(partial output, max, log-sum-exp)`` and merges exactly
(:func:`~llmdeploy.kv.attention.merge_partials`). What moves per decode step and layer is the
queries and partials, independent of the context length; KV moves only once, when written.

Choices of ours (the paper has no public code): a lender is a process holding only KV (the
paper's instances also run the model); placement is greedy (a rank already holding blocks of
the sequence first, so each request's attention involves few ranks, then the most free); the
protocol is synchronous point-to-point messages on the default group (gloo on CPU, NCCL on GPU),
with the group's timeout; a rank that stops answering raises :class:`DistributedKVError`.
Start with :func:`launch` (``torch.multiprocessing``) or under ``torchrun``: rank 0 builds a
:class:`DistKVCache`, the other ranks call :func:`serve_blocks`.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import logging
import os
import socket
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Hashable

import torch
import torch.distributed as dist

from ..errors import ConfigError, DistributedKVError
from .attention import merge_partials
from .blocks import BlockAllocator, BlockTables
from .cache import PagedKVCache
from .engine import PagedEngine
from .quant import KVQuantConfig
from .store import BlockStore

log = logging.getLogger(__name__)

WRITE, ATTEND, ALLOC, FREE, STOP, STATS = 1, 2, 3, 4, 5, 6
HEADER = 10
_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATTN_IMPLEMENTATION = "llmdeploy_distattn"


# --- messaging ---------------------------------------------------------------------------------
class Comm:
    """Point-to-point messages with rank 0, counting the bytes rank 0 sends and receives."""

    def __init__(self):
        self.sent = 0
        self.received = 0
        # NCCL moves CUDA tensors only; gloo moves CPU tensors
        self.device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                       else torch.device("cpu"))

    def send(self, t: torch.Tensor, dst: int) -> None:
        t = t.to(self.device).contiguous()
        try:
            dist.send(t, dst)
        except Exception as e:  # gloo raises RuntimeError on a closed peer or a timeout
            raise DistributedKVError(f"rank {dst} stopped answering ({str(e).splitlines()[0]}); the KV blocks it held "
                                     "are lost: restart the DistAttention group") from e
        self.sent += t.numel() * t.element_size()

    def recv(self, shape, dtype, src: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        try:
            dist.recv(t, src)
        except Exception as e:
            raise DistributedKVError(f"rank {src} stopped answering ({str(e).splitlines()[0]}); the KV blocks it held "
                                     "are lost: restart the DistAttention group") from e
        self.received += t.numel() * t.element_size()
        return t

    def header(self, dst: int, *fields: int) -> None:
        h = torch.zeros(HEADER, dtype=torch.int64)
        h[: len(fields)] = torch.tensor(fields, dtype=torch.int64)
        self.send(h, dst)


# --- the managers ------------------------------------------------------------------------------
class RManager:
    """A rank's own blocks: an allocator and, for blocks lent to another rank's sequences, the
    logical position each physical block holds."""

    def __init__(self, num_blocks: int):
        self.allocator = BlockAllocator(num_blocks)
        self.lent: dict[int, list[tuple[int, int]]] = defaultdict(list)  # seq -> [(logical, physical)]

    def lend(self, seq: int, n: int, first_logical: int) -> list[int]:
        blocks = self.allocator.allocate(seq, n)
        self.lent[seq].extend((first_logical + i, b) for i, b in enumerate(blocks))
        return blocks

    def give_back(self, seq: int) -> list[int]:
        blocks = [b for _, b in self.lent.pop(seq, [])]
        self.allocator.free(blocks)
        return blocks

    def table(self, seqs: list[int], lengths: list[int], block_size: int):
        """Physical table, key positions and validity of the blocks held for each row."""
        rows = [sorted(self.lent.get(s, [])) for s in seqs]
        nb = max(1, max(len(r) for r in rows))
        table = torch.zeros(len(seqs), nb, dtype=torch.long)
        logical = torch.full((len(seqs), nb), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                logical[i, : len(r)] = torch.tensor([lg for lg, _ in r])
                table[i, : len(r)] = torch.tensor([b for _, b in r])
        off = torch.arange(block_size)
        k_pos = (logical[:, :, None] * block_size + off).reshape(len(seqs), -1)
        valid = ((logical[:, :, None] >= 0) & (k_pos.view(len(seqs), nb, block_size) <
                                                 torch.tensor(lengths)[:, None, None])).reshape(len(seqs), -1)
        return table, k_pos, valid


class GManager:
    """Rank 0's ledger of free blocks on every lending rank; picks where borrowed blocks go."""

    def __init__(self, free: dict[int, int]):
        self.free = dict(free)
        self.borrowed: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))  # seq -> rank -> n

    @property
    def num_free(self) -> int:
        return sum(self.free.values())

    def place(self, n: int, seq: int | None = None) -> list[tuple[int, int]]:
        """``(rank, count)`` placements for ``n`` blocks: first the ranks that already hold blocks
        of ``seq`` (so a request's attention involves as few ranks as possible), then the rank
        with the most free blocks."""
        out = []
        held = self.borrowed.get(seq, {}) if seq is not None else {}
        for rank in sorted(self.free, key=lambda r: (-held.get(r, 0), -self.free[r], r)):
            if n == 0:
                break
            k = min(n, self.free[rank])
            if k:
                out.append((rank, k))
                n -= k
        if n:
            raise RuntimeError("GManager.place called without enough free blocks (reserve first)")
        return out


class DistBlockTables(BlockTables):
    """Block tables whose blocks come from rank 0 first, then from lenders chosen by the
    :class:`GManager`."""

    def __init__(self, allocator: BlockAllocator, block_size: int, gmanager: GManager, comm: Comm):
        super().__init__(allocator, block_size)
        self.gmanager, self.comm = gmanager, comm

    @property
    def num_free(self) -> int:
        return self.allocator.num_free + self.gmanager.num_free

    @property
    def capacity(self) -> int:
        return self.allocator.num_blocks + sum(self.gmanager.free.values()) + sum(
            n for ranks in self.gmanager.borrowed.values() for n in ranks.values())

    def _take(self, seq: Hashable, n: int) -> list[tuple[int, int]]:
        local = min(n, self.allocator.num_free)
        out = [(0, b) for b in self.allocator.allocate(seq, local)] if local else []
        logical = len(self.tables[seq]) + local
        for rank, k in self.gmanager.place(n - local, seq):
            self.comm.header(rank, ALLOC, int(seq), k, logical)
            ids = self.comm.recv((k,), torch.int64, rank)
            out.extend((rank, int(b)) for b in ids)
            self.gmanager.free[rank] -= k
            self.gmanager.borrowed[seq][rank] += k
            logical += k
        return out

    def _release(self, seq: Hashable, blocks: list[tuple[int, int]]) -> None:
        self.allocator.free([b for loc, b in blocks if loc == 0])
        for rank, k in self.gmanager.borrowed.pop(seq, {}).items():
            self.comm.header(rank, FREE, int(seq))
            self.gmanager.free[rank] += k


# --- rank 0: the cache and its attention ---------------------------------------------------------
_ACTIVE: contextvars.ContextVar[DistKVCache | None] = contextvars.ContextVar("llmdeploy_distkv", default=None)


class DistKVCache(PagedKVCache):
    """Rank 0's paged cache whose blocks may live on other ranks (requires an initialised
    default process group; the other ranks run :func:`serve_blocks`). Models must run with the
    attention implementation :data:`ATTN_IMPLEMENTATION` (use :meth:`attach`)."""

    supports_truncate = False

    needs_mask = False

    def __init__(self, num_blocks: int, block_size: int = 16, *, quant: KVQuantConfig | None = None,
                 dtype: torch.dtype | None = None):
        if not dist.is_initialized():
            raise ConfigError("DistKVCache needs torch.distributed initialised (use llmdeploy.kv.distributed.launch "
                              "or torchrun)")
        if dist.get_rank() != 0:
            raise ConfigError("DistKVCache lives on rank 0; other ranks call serve_blocks()")
        if quant is not None and "channel" in (quant.key_axis, quant.value_axis):
            raise ConfigError("DistAttention stores per-token quantized KV only: use key_axis='token', value_axis='token'")
        self.comm = Comm()
        free = {}
        for rank in range(1, dist.get_world_size()):
            hello = self.comm.recv((2,), torch.int64, rank)
            free[rank] = int(hello[0])
        self.gmanager = GManager(free)
        super().__init__(num_blocks, block_size, quant=quant, dtype=dtype)

    def _make_tables(self, num_blocks: int, block_size: int) -> BlockTables:
        return DistBlockTables(BlockAllocator(num_blocks), block_size, self.gmanager, self.comm)

    def add(self, seq: Hashable) -> None:
        if not isinstance(seq, int):
            raise ConfigError(f"DistAttention sequence ids are ints, got {seq!r}")
        super().add(seq)

    def _update(self, key_states, value_states, layer_idx):
        plan = self._begin_layer(layer_idx, key_states)
        k = key_states[plan.write_rows, :, plan.write_cols]
        v = value_states[plan.write_rows, :, plan.write_cols]
        for loc in torch.unique(plan.write_locs).tolist():
            sel = plan.write_locs == loc
            if loc == 0:
                self.store.write(layer_idx, plan.write_blocks[sel], plan.write_offsets[sel], k[sel], v[sel])
            else:
                ks, vs = k[sel].cpu(), v[sel].cpu()
                self.comm.header(loc, WRITE, layer_idx, ks.shape[0], ks.shape[1], ks.shape[2],
                                 _DTYPES.index(ks.dtype))
                for t in (plan.write_blocks[sel], plan.write_offsets[sel], ks, vs):
                    self.comm.send(t, loc)
        return key_states, value_states

    def attention(self, layer_idx: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Merged attention of ``q`` (B, H, T, D) over every block of the step's rows."""
        plan = self._plan
        B, H, T, D = q.shape
        q_pos = torch.tensor(plan.start)[:, None] + torch.arange(T)[None, :]
        lengths = plan.lengths
        # send the query to every rank that holds blocks of some row, then work locally
        remote = {}
        for rank in sorted(set(plan.table_locs.unique().tolist()) - {-1, 0}):
            rows = (plan.table_locs == rank).any(dim=1).nonzero(as_tuple=True)[0]
            qs = q[rows].cpu()
            scale_bits = int(torch.tensor([scale], dtype=torch.float64).view(torch.int64))
            self.comm.header(rank, ATTEND, layer_idx, len(rows), H, T, D, _DTYPES.index(qs.dtype), scale_bits)
            seqs = torch.tensor([plan.seqs[i] for i in rows.tolist()], dtype=torch.int64)
            for t in (seqs, lengths[rows], qs, q_pos[rows]):
                self.comm.send(t, rank)
            remote[rank] = rows
        nb = plan.table.shape[1]
        bs = self.block_size
        k_pos = torch.arange(nb * bs).expand(B, -1)
        local = (plan.table_locs == 0).repeat_interleave(bs, dim=1) & (k_pos < lengths[:, None])
        dev = q.device
        partials = []
        if layer_idx in self.store.keys:
            table = torch.where(plan.table_locs == 0, plan.table, torch.zeros_like(plan.table))
            partials.append(self.store.attend(layer_idx, q, q_pos.to(dev), table.to(dev), k_pos.to(dev),
                                              local.to(dev), scale))
        for rank, rows in remote.items():
            n = len(rows)
            out = self.comm.recv((n, H, T, D), q.dtype, rank)
            mx = self.comm.recv((n, H, T), torch.float32, rank)
            lse = self.comm.recv((n, H, T), torch.float32, rank)
            full = (torch.zeros(B, H, T, D, dtype=q.dtype, device=dev),
                    torch.full((B, H, T), float("-inf"), device=dev), torch.full((B, H, T), float("-inf"), device=dev))
            rows = rows.to(dev)
            full[0][rows], full[1][rows], full[2][rows] = out.to(dev), mx.to(dev), lse.to(dev)
            partials.append(full)
        return merge_partials(partials)[0]

    def stop_workers(self) -> None:
        """Tell every lending rank to exit its loop."""
        for rank in range(1, dist.get_world_size()):
            with contextlib.suppress(DistributedKVError):
                self.comm.header(rank, STOP)

    def lender_stats(self) -> dict[int, dict[str, int]]:
        """Free and used blocks reported by each lending rank itself (checks the ledger)."""
        out = {}
        for rank in range(1, dist.get_world_size()):
            self.comm.header(rank, STATS)
            free, used, pid = self.comm.recv((3,), torch.int64, rank).tolist()
            out[rank] = {"free": free, "used": used, "pid": pid}
        return out

    @contextlib.contextmanager
    def attach(self, model):
        """Run ``model``'s attention through this cache (DistAttention) inside the block."""
        register_attention()
        previous = model.config._attn_implementation
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        token = _ACTIVE.set(self)
        try:
            yield model
        finally:
            _ACTIVE.reset(token)
            model.set_attn_implementation(previous)


def _dist_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    cache = _ACTIVE.get()
    if cache is None:
        raise ConfigError("the DistAttention implementation runs only inside DistKVCache.attach(model)")
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise ConfigError("DistAttention does not implement sliding-window or soft-capped attention")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = cache.attention(module.layer_idx, query, scale)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register DistAttention with transformers' attention interface (idempotent)."""
    from transformers import AttentionInterface
    AttentionInterface.register(ATTN_IMPLEMENTATION, _dist_attention)


# --- lending ranks ----------------------------------------------------------------------------
def serve_blocks(num_blocks: int, block_size: int = 16, *, quant: KVQuantConfig | None = None) -> dict:
    """The loop of a lending rank: hold ``num_blocks`` KV blocks, store what rank 0 writes,
    answer attention queries over them, until rank 0 says stop. Returns counters."""
    comm = Comm()
    manager = RManager(num_blocks)
    store = BlockStore(num_blocks, block_size, quant=quant, device=comm.device)
    comm.send(torch.tensor([num_blocks, os.getpid()], dtype=torch.int64), 0)
    served = 0
    while True:
        h = comm.recv((HEADER,), torch.int64, 0).tolist()
        op = h[0]
        if op == STOP:
            break
        if op == WRITE:
            layer, n, heads, dim, dt = h[1:6]
            blocks = comm.recv((n,), torch.int64, 0)
            offsets = comm.recv((n,), torch.int64, 0)
            k = comm.recv((n, heads, dim), _DTYPES[dt], 0)
            v = comm.recv((n, heads, dim), _DTYPES[dt], 0)
            store.write(layer, blocks, offsets, k, v)
        elif op == ATTEND:
            layer, n, heads, T, dim, dt, scale_bits = h[1:8]
            scale = float(torch.tensor([scale_bits], dtype=torch.int64).view(torch.float64))
            seqs = comm.recv((n,), torch.int64, 0).tolist()
            lengths = comm.recv((n,), torch.int64, 0).tolist()
            q = comm.recv((n, heads, T, dim), _DTYPES[dt], 0)
            q_pos = comm.recv((n, T), torch.int64, 0)
            table, k_pos, valid = (t.to(comm.device) for t in manager.table(seqs, lengths, block_size))
            out, mx, lse = store.attend(layer, q, q_pos, table, k_pos, valid, scale)
            for t in (out, mx, lse):
                comm.send(t, 0)
            served += 1
        elif op == ALLOC:
            seq, n, first = h[1:4]
            comm.send(torch.tensor(manager.lend(seq, n, first), dtype=torch.int64), 0)
        elif op == FREE:
            store.release(manager.give_back(h[1]))
        elif op == STATS:
            a = manager.allocator
            comm.send(torch.tensor([a.num_free, a.num_blocks - a.num_free, os.getpid()], dtype=torch.int64), 0)
    manager.allocator.check()
    return {"attention_calls": served, "bytes_sent": comm.sent, "bytes_received": comm.received}


def run(fn: Callable, *, blocks_per_rank: int, block_size: int = 16, quant: KVQuantConfig | None = None,
        timeout: float = 120.0, args: tuple = ()):
    """Entry point under ``torchrun``: join the default group from the environment (NCCL when
    CUDA is available, otherwise gloo); rank 0 returns ``fn(cache, *args)``, the other ranks lend
    ``blocks_per_rank`` blocks until rank 0 is done and return ``None``."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    try:
        if dist.get_rank() == 0:
            cache = DistKVCache(blocks_per_rank, block_size, quant=quant)
            try:
                return fn(cache, *args)
            finally:
                with contextlib.suppress(Exception):
                    cache.stop_workers()
        serve_blocks(blocks_per_rank, block_size, quant=quant)
        return None
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# --- starting a group -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, timeout: float, blocks_per_rank: int, block_size: int,
           quant, fn, args, result_path: str, threads: int, local_blocks: int) -> None:
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        if rank == 0:
            cache = DistKVCache(local_blocks, block_size, quant=quant)
            try:
                result = fn(cache, *args)
            finally:
                with contextlib.suppress(Exception):
                    cache.stop_workers()
            torch.save(result, result_path)
        else:
            serve_blocks(blocks_per_rank, block_size, quant=quant)
    except BaseException as e:
        if rank == 0:
            with open(result_path + ".err", "w") as f:
                f.write(f"{type(e).__name__}: {e}")
        raise
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def launch(fn: Callable, world_size: int, *, blocks_per_rank: int, block_size: int = 16,
           quant: KVQuantConfig | None = None, args: tuple = (), timeout: float = 120.0,
           run_timeout: float | None = None, threads: int = 1, local_blocks: int | None = None):
    """Run ``fn(cache, *args)`` on rank 0 of a new gloo group of ``world_size`` local processes,
    the others lending ``blocks_per_rank`` blocks each (rank 0 holds ``local_blocks``, by default
    as many); returns what ``fn`` returned (it must be
    loadable with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, dicts;
    ``fn`` a module-level function). ``timeout`` bounds the start-up and every message (the
    group's timeout); ``run_timeout``, when given, the whole run. Raises
    :class:`DistributedKVError` when rank 0 fails (a lender's death reaches it as that error) or
    runs past ``run_timeout``."""
    import multiprocessing

    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1, got {world_size}")
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.pt")
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(rank, world_size, port, timeout, blocks_per_rank, block_size,
                                                  quant, fn, args, path, threads,
                                                  blocks_per_rank if local_blocks is None else local_blocks),
                             daemon=True)
                 for rank in range(world_size)]
        for p in procs:
            p.start()
        try:
            deadline = time.monotonic() + run_timeout if run_timeout else float("inf")
            while procs[0].is_alive() and time.monotonic() < deadline:
                procs[0].join(timeout=0.5)
                if any(p.exitcode not in (None, 0) for p in procs[1:]) and not os.path.exists(path):
                    # a lender died: rank 0 notices at its next message to it (or at the timeout)
                    procs[0].join(timeout=timeout + 5)
                    break
            if procs[0].is_alive():
                raise DistributedKVError(f"rank 0 of the DistAttention group did not finish within {run_timeout:.0f} s")
            for p in procs[1:]:
                p.join(timeout=10)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
        if os.path.exists(path + ".err"):
            with open(path + ".err") as f:
                msg = f.read()
            raise DistributedKVError(f"rank 0 of the DistAttention group failed: {msg}")
        if not os.path.exists(path):
            raise DistributedKVError(f"rank 0 of the DistAttention group exited with code {procs[0].exitcode} "
                                     "and no result")
        return torch.load(path, weights_only=True)


def _generate_job(cache: DistKVCache, load_model: Callable, prompts: list[list[int]], max_new_tokens: int,
                  prefill_chunk: int | None) -> dict:
    m = load_model()
    if isinstance(m, tuple):  # llmdeploy.load returns (model, tokenizer)
        m = m[0]
    engine = PagedEngine(m.eval(), cache, max_batch=max(1, len(prompts)), prefill_chunk=prefill_chunk)
    ids = [engine.add_request(p, max_new_tokens) for p in prompts]
    peak = 0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        peak = max(peak, sum(v["used"] for v in cache.lender_stats().values()))
    seconds = time.perf_counter() - t0
    out = engine.run()
    return {"tokens": [out[i] for i in ids], "peak_borrowed_blocks": peak, "seconds": seconds,
            "bytes_moved": cache.comm.sent + cache.comm.received,
            "borrowed_after": sum(v["used"] for v in cache.lender_stats().values()),
            "local_free_after": cache.blocks.allocator.num_free}


def generate_distributed(load_model: Callable, prompts: list[list[int]], max_new_tokens: int, *, world_size: int,
                         blocks_per_rank: int, block_size: int = 16, local_blocks: int | None = None,
                         quant: KVQuantConfig | None = None, prefill_chunk: int | None = 256,
                         timeout: float = 120.0, run_timeout: float | None = None) -> dict:
    """Greedy generation with the KV cache spread over ``world_size`` local processes. Rank 0
    builds the model with ``load_model()`` (picklable: e.g. ``functools.partial(llmdeploy.load,
    "smollm2-135m")``; a ``(model, tokenizer)`` pair is accepted); returns ``{"tokens": [...],
    "peak_borrowed_blocks", "seconds", "bytes_moved", "borrowed_after", "local_free_after"}``
    (the last two show every block came back)."""
    return launch(_generate_job, world_size, blocks_per_rank=blocks_per_rank, block_size=block_size, quant=quant,
                  args=(load_model, [list(map(int, p)) for p in prompts], max_new_tokens, prefill_chunk),
                  timeout=timeout, run_timeout=run_timeout, local_blocks=local_blocks)
