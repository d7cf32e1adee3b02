"""What a training run needs, checked in seconds: `--dry-run`, and the preflight of every start.

Before a job waits hours in a Slurm queue (`--dry-run`), and again on every rank before DeepSpeed
starts (so a mistake is one line, not a per-rank traceback): the model folders load as configs and
tokenizer, the projector is a file, the DeepSpeed config resolves, the shards and their manifest
are there and enough for `world_size` ranks, and the run has at least one optimizer step. No model
weights are loaded and no process group is started.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from pipeline.conventions import IMAGE_TOKEN
from pipeline.data.loader import check_readers
from pipeline.data.shards import ShardCountWarning
from pipeline.data.sources import describe
from pipeline.train.config import TrainConfig
from pipeline.train.plan import run_plan, shard_sets


def preflight(cfg: TrainConfig, world_size: int) -> list[str]:
    """Problems found, each one line naming the file or key and the fix."""
    problems = [problem for check in (_model_folders, _deepspeed, _shards) for problem in check(cfg, world_size)]
    if not problems:
        problems += _checkpoints(cfg, world_size)
    if not problems and run_plan(cfg, world_size).total_steps < 1:
        problems.append(f"{cfg.shards or 'data'}: not enough samples for one optimizer step with {world_size} ranks × "
                        f"batch {cfg.loader.batch_size} × accum {cfg.optim.grad_accum}")
    return problems


def dry_run(cfg: TrainConfig, world_size: int, gpu: str | None = None) -> list[str]:
    """The preflight, and what the run would be when it passes (printed): with `gpu` (or a CUDA
    config) also the memory plan per GPU (pipeline/train/memory.py), with a warning when it does not fit."""
    problems = preflight(cfg, world_size)
    if not problems:
        from pipeline.model.assemble import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
        print(f"[dry-run] tokenizer of {cfg.model.tokenizer or cfg.model.llm}: {len(tokenizer)} tokens, "
              f"{IMAGE_TOKEN} = id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}", flush=True)
        print(f"[dry-run] data: {describe(shard_sets(cfg))}", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ShardCountWarning)
            messages = check_readers(shard_sets(cfg), world_size, cfg.loader.num_workers)
        for message in messages:
            print(f"[dry-run] warning: {message}", flush=True)
        print(f"[dry-run] {cfg.stage}: {run_plan(cfg, world_size).total_steps} optimizer steps on {world_size} rank(s) "
              f"(batch {cfg.loader.batch_size} × accum {cfg.optim.grad_accum} per rank); run folder "
              f"{cfg.run_dir}", flush=True)
        if gpu is not None or cfg.device == "cuda":
            _print_memory_plan(cfg, world_size, gpu or "h100-80gb")
    return problems


def _print_memory_plan(cfg: TrainConfig, world_size: int, gpu: str) -> None:
    from pipeline.train.memory import GPUS, plan

    if gpu not in GPUS:
        print(f"[dry-run] memory plan: unknown --gpu {gpu}; one of {', '.join(sorted(GPUS))}", flush=True)
        return
    result = plan(cfg, world_size, gpu)
    for line in result.text(gpu).splitlines():
        print(f"[dry-run] memory {line}", flush=True)
    if not result.fits():
        print(f"[dry-run] warning: the estimated peak ({result.totals[0] / 2**30:.0f} GiB per GPU) exceeds {gpu}: "
              "turn on model.gradient_checkpointing, lower loader.batch_size (raise optim.grad_accum), "
              "or offload the optimizer (configs/deepspeed/zero3_offload.json)", flush=True)


def _model_folders(cfg: TrainConfig, world_size: int) -> list[str]:
    from transformers import AutoConfig

    from pipeline.model.assemble import load_tokenizer

    problems = []
    for key, folder in (("model.llm", cfg.model.llm), ("model.vision_tower", cfg.model.vision_tower)):
        try:
            AutoConfig.from_pretrained(folder)
        except (OSError, ValueError) as err:
            problems.append(f"{key}={folder}: not a model folder transformers can read ({_first_line(err)}); "
                            "point it at a folder with config.json and the weights")
    try:
        load_tokenizer(cfg.model)
    except (OSError, ValueError, TypeError) as err:
        problems.append(f"model.tokenizer/model.llm={cfg.model.tokenizer or cfg.model.llm}: no loadable tokenizer "
                        f"({_first_line(err)})")
    if cfg.model.projector is not None and not Path(cfg.model.projector).is_file():
        problems.append(f"model.projector={cfg.model.projector}: not a file; give the projector export itself "
                        "(e.g. runs/<stage1>/export/projector.safetensors)")
    return problems


def _deepspeed(cfg: TrainConfig, world_size: int) -> list[str]:
    from pipeline.train.engine import deepspeed_config

    try:
        deepspeed_config(cfg, "cpu")
    except (ValueError, OSError) as err:
        return [f"deepspeed_config={cfg.deepspeed_config}: {_first_line(err)}"]
    return []


def _shards(cfg: TrainConfig, world_size: int) -> list[str]:
    try:
        sets = shard_sets(cfg)  # reads the manifests
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ShardCountWarning)
            check_readers(sets, world_size, cfg.loader.num_workers)
    except (OSError, ValueError) as err:  # missing, unreachable, too few shards
        return [_first_line(err)]
    return []


def _checkpoints(cfg: TrainConfig, world_size: int) -> list[str]:
    """What a resume would find in the run folder: the step it would load, written by how many ranks."""
    from pipeline.train.checkpoint import (CheckpointError, read_marker, step_tag, step_to_resume,
                                           world_size_message)
    from pipeline.train.engine import deepspeed_config
    from pipeline.train.run_folder import RunFolder

    ckpt_dir = RunFolder(cfg.run_dir).checkpoints
    try:
        step = step_to_resume(ckpt_dir, cfg.checkpoint)
        if step is None:
            return []
        saved_world = int(read_marker(ckpt_dir / step_tag(step))["world_size"])
    except CheckpointError as err:
        return [_first_line(err)]
    universal = deepspeed_config(cfg, "cpu").get("checkpoint", {}).get("load_universal", False)
    if saved_world == world_size or universal:
        return []
    if step >= run_plan(cfg, saved_world).total_steps:
        return [f"run_dir={cfg.run_dir}: this run finished (step {step} of {step}, on {saved_world} ranks); "
                f"nothing to resume. Its results are in {cfg.run_dir}; to train again use a new run_dir"]
    return [f"run_dir={cfg.run_dir}: " + world_size_message(ckpt_dir, step, saved_world, world_size)]


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
