"""DeepSpeed set-up: the device, distributed init, the resolved DeepSpeed config, optimizer, LR schedule.

The JSON in configs/deepspeed/ says *how* to shard; values marked "auto" are filled from the stage
config here, so batch size, clipping and precision have one source of truth, and the ZeRO-3 bucket
sizes from the LLM's hidden size as transformers' DeepSpeed integration fills them, so a LLaVA
`zero3.json` behaves as under LLaVA's scripts.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import shutil
import subprocess
from pathlib import Path

import deepspeed
import torch
from transformers import AutoConfig
from transformers.integrations import HfDeepSpeedConfig

from pipeline.model.assemble import resolve_dtype
from pipeline.train.config import TrainConfig
from pipeline.train.distributed import collective_timeout

log = logging.getLogger("pipeline.train")

# transformers' trainer_config_finalize (integrations/deepspeed.py): h², 0.9·h² and 10·h for the
# LLM's hidden size h (the Llava config has none of its own; HF then takes text_config's).
_BUCKET_SIZES = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def device_type(requested: str) -> str:
    """"cuda" or "cpu" for the config's `device`. A GPU node must never train on CPU by accident
    (a CPU torch installed from a login node, a CUDA build newer than the driver: torch then sees no
    GPU and `auto` would run gloo/fp32 without a word), so `auto` stops with one line when the
    driver lists GPUs that torch cannot use, and `cuda` when torch sees none."""
    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    listed = gpus_listed_by_driver()
    build = f"torch {torch.__version__} ({f'CUDA {torch.version.cuda}' if torch.version.cuda else 'a CPU build'})"
    if requested == "cuda":
        seen = f" although `nvidia-smi -L` lists {listed}" if listed else ""
        raise SystemExit(f"device: cuda, but {build} sees no GPU{seen}: run on a GPU node with the torch "
                         "build for its driver, or set device: cpu")
    if listed:
        raise SystemExit(f"device: auto, but {build} sees none of the {listed} GPU(s) `nvidia-smi -L` lists: "
                         "install the torch build for this node's driver, or set device: cpu to train on CPU "
                         "on purpose")
    return "cpu"


def gpus_listed_by_driver() -> int:
    """GPUs `nvidia-smi -L` lists (one "GPU i: name (UUID: …)" line each); 0 without nvidia-smi or
    when it cannot reach a driver."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return 0
    try:
        listing = subprocess.run([executable, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if listing.returncode != 0:
        return 0
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())


def init_distributed(dev: str, timeout_minutes: float = 60.0) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the environment that the stage entry prepared with
    pipeline.train.launch_env (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
    `timeout_minutes`: how long any collective may wait (distributed.timeout_minutes)."""
    from pipeline.train.launch_env import RANK_VARIABLES
    missing = [name for name in RANK_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: call pipeline.train.launch_env."
                           "apply_rank_environment() first (the stage entry, pipeline.train.cli, does)")
    deepspeed.init_distributed(dist_backend="nccl" if dev == "cuda" else "gloo", auto_mpi_discovery=False,
                               timeout=datetime.timedelta(minutes=timeout_minutes))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ["LOCAL_RANK"])
    if rank == 0:
        timeout = collective_timeout()
        log.info("process group: %d ranks over %s, collective timeout %s min", world, torch.distributed.get_backend(),
                 f"{timeout.total_seconds() / 60:g}" if timeout is not None else "unknown")
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
    # the engine's precision is the model's: model.dtype=bf16 trains in bf16 on DeepSpeed's CPU
    # accelerator too (where a fp32 engine around bf16 weights stopped in ZeRO-3's dtype checks)
    model_bf16 = resolve_dtype(cfg.model.dtype, dev) == torch.bfloat16
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = model_bf16
    elif bool(bf16["enabled"]) != model_bf16:
        raise ValueError(f"{cfg.deepspeed_config}: bf16.enabled={bf16['enabled']} contradicts model.dtype="
                         f"{cfg.model.dtype} on {dev}; set it to \"auto\"")
    if ds.get("fp16", {}).get("enabled") == "auto":  # LLaVA's JSON files have it; model.dtype has no fp16
        ds["fp16"]["enabled"] = False
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ValueError(f"{cfg.deepspeed_config}: remove the '{section}' section: optimizer and LR schedule "
                             "come from the stage config's optim section (with offload: DeepSpeed's CPU Adam)")
    _fill_bucket_sizes(ds.setdefault("zero_optimization", {}), cfg)
    ds.pop("train_batch_size", None)
    return ds


def _fill_bucket_sizes(zero: dict, cfg: TrainConfig) -> None:
    """The "auto" bucket sizes from the LLM's hidden size. The stage-3 ones mean nothing below
    stage 3 (transformers leaves them unfilled there): dropped."""
    for key in [k for k in _BUCKET_SIZES if k.startswith("stage3_") and zero.get("stage") != 3]:
        if zero.get(key) == "auto":
            zero.pop(key)
    auto = [key for key in _BUCKET_SIZES if zero.get(key) == "auto"]
    if auto:
        hidden = llm_hidden_size(cfg)
        for key in auto:
            zero[key] = _BUCKET_SIZES[key](hidden)


def llm_hidden_size(cfg: TrainConfig) -> int:
    """The LLM's hidden size, looked up as transformers' DeepSpeed integration does (hidden_size,
    the largest of hidden_sizes, or the same in text_config)."""
    try:
        config = AutoConfig.from_pretrained(cfg.model.llm)
    except (OSError, ValueError) as err:
        raise ValueError(f"the \"auto\" bucket sizes of {cfg.deepspeed_config} need the LLM's hidden size, "
                         f"but model.llm={cfg.model.llm} has no readable config "
                         f"({(str(err).strip() or type(err).__name__).splitlines()[0]})") from None
    for candidate in (config, getattr(config, "text_config", None)):
        if hasattr(candidate, "hidden_size"):
            return candidate.hidden_size
        if hasattr(candidate, "hidden_sizes"):
            return max(candidate.hidden_sizes)
    raise ValueError(f"model.llm={cfg.model.llm}: its config has no hidden_size for the \"auto\" bucket sizes "
                     f"of {cfg.deepspeed_config}; give them as integers there")


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


def optimizer_offloaded(ds: dict) -> bool:
    """Does ZeRO keep the optimizer states (and run the step) on the host?"""
    offload = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, ds: dict, dev: str) -> torch.optim.Optimizer:
    """AdamW, as DeepSpeed's CPU Adam when the optimizer is offloaded: the step then runs on the
    host's fp32 partitions, and DeepSpeed refuses a torch optimizer there (ZeRORuntimeException).
    CPU Adam is a C++ op built on first use (cached under TORCH_EXTENSIONS_DIR)."""
    betas, lr, decay = tuple(cfg.optim.betas), cfg.optim.lr, cfg.optim.weight_decay
    if optimizer_offloaded(ds):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, betas=betas, weight_decay=decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=decay, fused=dev == "cuda")


def initialize(model: torch.nn.Module, cfg: TrainConfig, ds: dict, total_steps: int, dev: str):
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg, ds, dev)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, cfg.optim.warmup_ratio, cfg.optim.schedule))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    return engine, optimizer, scheduler
