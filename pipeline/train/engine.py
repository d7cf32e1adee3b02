"""DeepSpeed set-up: distributed init, the resolved DeepSpeed config, optimizer, LR schedule.

The JSON in configs/deepspeed/ says *how* to shard; values marked "auto" are filled from the stage
config here, so batch size, clipping and precision have one source of truth.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import deepspeed
import torch
from transformers.integrations import HfDeepSpeedConfig

from pipeline.train.config import TrainConfig


def device_type(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def init_distributed(dev: str) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the environment that the stage entry prepared with
    pipeline.train.launch_env (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    from pipeline.train.launch_env import RANK_VARIABLES
    missing = [name for name in RANK_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: call pipeline.train.launch_env."
                           "apply_rank_environment() first (the stage entry, pipeline.train.cli, does)")
    deepspeed.init_distributed(dist_backend="nccl" if dev == "cuda" else "gloo", auto_mpi_discovery=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ["LOCAL_RANK"])
    if dev != "cuda":
        torch.distributed.barrier()  # every rank has mapped every peer's buffer by now
        unlink_shm_buffers(rank)
    if dev == "cuda":
        torch.cuda.set_device(local_rank)
    return rank, local_rank, world


def unlink_shm_buffers(rank: int, shm_dir: Path = Path("/dev/shm")) -> list[Path]:
    """Remove the names of this rank's DeepSpeed CPU allreduce buffers; returns the removed paths.

    DeepSpeed's CPU comm op puts a 66 MB buffer per rank in shared memory
    (`deepspeed_allreduce_buffer_<uid>_<master addr>_<master port>_<rank>`) and never unlinks it,
    so every CPU run, finished or killed, left 66 MB per rank in /dev/shm until the machine ran out
    of memory. Once all ranks have mapped each other's buffers the names are no longer needed:
    unlinked, the memory stays valid for the running ranks and is freed when the last one exits.
    """
    port = os.environ.get("MASTER_PORT", "*")
    removed = []
    for path in shm_dir.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def deepspeed_config(cfg: TrainConfig, dev: str) -> dict:
    ds = json.loads(Path(cfg.deepspeed_config).read_text())
    fill = {
        "train_micro_batch_size_per_gpu": cfg.loader.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ValueError(f"{cfg.deepspeed_config}: '{key}' = {ds[key]} contradicts the stage config "
                             f"({value}); set it to \"auto\"")
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = dev == "cuda" and cfg.model.dtype in ("auto", "bf16")
    zero = ds.setdefault("zero_optimization", {})
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if zero.get(key) == "auto":
            zero.pop(key)  # DeepSpeed's defaults; HfDeepSpeedConfig would need the hidden size
    ds.pop("train_batch_size", None)
    return ds


def zero3_context(ds: dict) -> HfDeepSpeedConfig | None:
    """Keep the returned object alive while loading: transformers then loads into ZeRO-3 partitions."""
    if ds.get("zero_optimization", {}).get("stage") == 3:
        return HfDeepSpeedConfig(ds)
    return None


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    warmup = max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def initialize(model: torch.nn.Module, cfg: TrainConfig, ds: dict, total_steps: int, dev: str):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay, fused=dev == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, cfg.optim.warmup_ratio, cfg.optim.schedule))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    return engine, optimizer, scheduler
