"""Small collective helpers: every rank calls them at the same point of the loop."""
from __future__ import annotations

import datetime

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


_HOST_GROUP: list = []  # [the gloo group for host-side flags], made on first use


def host_group():
    """A gloo group beside NCCL for flags the host decides (epoch end, preemption, cache misses):
    reduced on the CPU, they never wait for the GPU's queued work, where a CUDA tensor's `.tolist()`
    would sync the stream at every micro-step. None (the default group) when that is gloo already.
    Made on first use, which every rank reaches at the same point of the loop (a collective)."""
    if dist.get_backend() != "nccl":
        return None
    if not _HOST_GROUP:
        _HOST_GROUP.append(dist.new_group(backend="gloo"))
    return _HOST_GROUP[0]


def any_rank(*flags: bool) -> list[bool]:
    """Per flag: is it set on any rank? One all-reduce for all flags, on the host."""
    if not _active():
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
    return [bool(v) for v in t.tolist()]


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Per key: the sum over ranks (every rank passes the same keys). One all-reduce."""
    if not _active() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def collective_timeout() -> datetime.timedelta | None:
    """How long a collective of the default group may wait, as its backend holds it (None when
    this torch does not expose it)."""
    group = dist.distributed_c10d._get_default_group()
    device = torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
    try:
        return group._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):
        return None


def barrier() -> None:
    if _active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group together: a group still alive at interpreter exit can abort a
    finished rank ("terminate called without an active exception", exit -6) while its gloo
    threads are torn down, which Slurm would count as a failed job."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        _HOST_GROUP.clear()
        dist.destroy_process_group()
