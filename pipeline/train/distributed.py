"""Small collective helpers: every rank calls them at the same point of the loop."""
from __future__ import annotations

import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def comm_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU ones."""
    if _active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(*flags: bool) -> list[bool]:
    """Per flag: is it set on any rank? One all-reduce for all flags."""
    if not _active():
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Per key: the sum over ranks (every rank passes the same keys). One all-reduce."""
    if not _active() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def barrier() -> None:
    if _active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group together: a group still alive at interpreter exit can abort a
    finished rank ("terminate called without an active exception", exit -6) while its gloo
    threads are torn down, which Slurm would count as a failed job."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()
