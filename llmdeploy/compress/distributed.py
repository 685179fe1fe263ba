"""Several processes calibrating one model (``torch.distributed``: gloo on CPU, NCCL on GPU).

Started with ``torchrun --nproc_per_node N``, each process holds the model (or streams its
blocks), takes a contiguous shard of the calibration windows, and accumulates its share of every
statistic the methods compute (XᵀX per linear, PCA covariances, Block Influence sums); the shares
are summed over the processes with ``all_reduce`` before a block is compressed. Every process
then holds the same statistics and compresses the block identically (the compression itself is
deterministic), so the processes never exchange weights; only rank 0 writes.

The sums are the single-process sums in another order (each rank's partial sum, then the sum of
the partials), equal up to floating-point rounding: the result equals the single-process result
to tolerance, not bitwise. Outside ``torch.distributed`` (or with one process) every function
here is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import CalibrationDataError


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1):
    NCCL when a GPU is visible, else gloo. Returns whether this process is part of a group."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes results (rank 0, or the only process)."""
    return world()[0] == 0


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the processes in place (and return it). Gloo reduces CPU tensors only:
    a GPU tensor is reduced through a CPU copy under gloo."""
    if world()[1] == 1:
        return t
    if t.device.type != "cpu" and dist.get_backend() == "gloo":
        tmp = t.cpu()
        dist.all_reduce(tmp)
        t.copy_(tmp)
    else:
        dist.all_reduce(t)
    return t


def all_reduce_int(n: int) -> int:
    """Sum an integer (a row count) over the processes."""
    if world()[1] == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def barrier() -> None:
    """Wait for every process (no-op alone)."""
    if world()[1] > 1:
        dist.barrier()


def shard_windows(calib: torch.Tensor) -> torch.Tensor:
    """This process's contiguous share of the calibration windows (all of them alone)."""
    rank, size = world()
    if size == 1:
        return calib
    if calib.shape[0] < size:
        raise CalibrationDataError(f"{calib.shape[0]} calibration windows cannot be shared by {size} processes: "
                                   f"use at least {size} windows or fewer processes")
    return torch.tensor_split(calib, size)[rank]


def my_rows(n: int) -> tuple[int, int]:
    """The contiguous slice ``[lo, hi)`` of ``n`` independent rows this process computes when a
    row-separable computation is shared (see :func:`gather_rows`)."""
    rank, size = world()
    parts = torch.tensor_split(torch.arange(n), size)
    mine = parts[rank]
    return (int(mine[0]), int(mine[-1]) + 1) if len(mine) else (0, 0)


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Every process's rows of a result split by :func:`my_rows`, concatenated in rank order
    (identity alone)."""
    rank, size = world()
    if size == 1:
        return local
    parts = torch.tensor_split(torch.arange(n), size)
    width = max(len(p) for p in parts)
    padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype)
    padded[:local.shape[0]] = local.cpu()
    gathered = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:len(p)] for g, p in zip(gathered, parts)]).to(local.device)
