"""A training job from components, in torchtitan's order: distributed → run folder → model → data →
engine → checkpointer (and the resume) → tracker. Each part is built by its own module; this file
only wires them. pipeline/train/loop.py drives the result.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import random
from typing import Any

import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from pipeline.config import dump_yaml, flatten
from pipeline.data.batch import SampleEncoder, collate
from pipeline.data.loader import build_loader
from pipeline.data.sources import ShardSet
from pipeline.model.assemble import AssembledModel, apply_freeze, build_llava, packs_one_row
from pipeline.model.lora import add_lora, trainable_parameters
from pipeline.train import engine as ds_engine, plan
from pipeline.train.checkpoint import Checkpointer
from pipeline.train.config import TrainConfig
from pipeline.train.metrics import DatasetCounts
from pipeline.train.rng import RNGState
from pipeline.train.run_folder import RunFolder
from pipeline.train.state import TrainState
from pipeline.train.step import CaptionTargets
from pipeline.train.tracking import Tracker

log = logging.getLogger("pipeline.train")


@dataclasses.dataclass
class Job:
    cfg: TrainConfig
    rank: int
    world: int
    run: RunFolder
    engine: Any                     # deepspeed.DeepSpeedEngine around the Llava model
    loader: StatefulDataLoader      # yields pipeline.data.batch.Batch
    checkpointer: Checkpointer
    tracker: Tracker
    state: TrainState
    caption_targets: CaptionTargets
    total_steps: int
    resumed: bool
    datasets: DatasetCounts         # samples per data set (logged for a mixture)


def build_job(cfg: TrainConfig) -> Job:
    dev = ds_engine.device_type(cfg.device)
    rank, _, world = ds_engine.init_distributed(dev, cfg.distributed.timeout_minutes)
    _seed_everything(cfg.seed + rank)
    run = RunFolder(cfg.run_dir).create()
    ds_config = ds_engine.deepspeed_config(cfg, dev)
    zero3 = ds_engine.zero3_context(ds_config)  # noqa: F841 — must stay alive while loading
    assembled = build_llava(cfg.model, dev)
    if cfg.lora is not None:
        add_lora(assembled.model, cfg.lora)
    trainable = _freeze(assembled, cfg, rank)
    run_plan = plan.run_plan(cfg, world)
    total_steps = run_plan.total_steps
    captions = plan.caption_plan(cfg, run_plan, assembled.model)
    loader = train_loader(cfg, assembled, run_plan.shard_sets, rank, world, captions_in_row=captions.in_rows)
    if total_steps < 1:  # the stage entry's preflight says so first; this holds for other callers
        raise SystemExit(f"{cfg.shards or 'data'}: not enough samples for one optimizer step "
                         f"({world} ranks × batch {cfg.loader.batch_size} × accum {cfg.optim.grad_accum})")
    engine, _, _ = ds_engine.initialize(assembled.model, cfg, ds_config, total_steps, dev)
    state = TrainState()
    datasets = DatasetCounts([d.label for d in cfg.datasets])
    # the frozen towers are rebuilt from their folders on resume; the checkpoint holds what trains
    checkpointer = Checkpointer(run.checkpoints, cfg.checkpoint, engine, global_state={"train_state": state},
                                rank_state={"loader": loader, "rng": RNGState(), "datasets": datasets},
                                trainable_only=True)
    resumed = checkpointer.load() is not None
    if resumed:
        log.info("rank %d resumed at step %d (epoch %d)", rank, state.step, state.epoch)
    loader.dataset.set_epoch(state.epoch)
    tracker = _open_tracker(cfg, run, rank, world, state, trainable, assembled.attention)
    if rank == 0:
        _write_run_files(cfg, run, tracker, ds_config, fresh=not resumed)
    run.rewind(state.step, rank)
    if rank == 0 and cfg.tga.enabled:
        log.info("TGA caption targets: %s", captions.describe())
    targets = CaptionTargets(cfg.tga.layers, cached=captions.cached)
    return Job(cfg, rank, world, run, engine, loader, checkpointer, tracker, state, targets, total_steps, resumed,
               datasets)


def train_loader(cfg: TrainConfig, assembled: AssembledModel, sets: list[ShardSet], rank: int, world: int,
                 captions_in_row: bool = False) -> StatefulDataLoader:
    encoder = SampleEncoder(assembled.tokenizer, assembled.image_processor,
                            num_image_tokens=assembled.num_image_tokens, template=cfg.prompt.template,
                            insert_retrieved=cfg.prompt.insert_retrieved, max_tokens=cfg.prompt.max_tokens,
                            pad_to_square=cfg.model.pad_to_square)
    batch = functools.partial(collate, pad_id=assembled.tokenizer.pad_token_id, packed=cfg.loader.packing,
                              single_row=packs_one_row(assembled.attention["llm"]),
                              captions_in_row=captions_in_row)
    return build_loader(sets, rank=rank, world_size=world, cfg=cfg.loader, encode=encoder,
                        collate=batch, seed=cfg.seed)


def _freeze(assembled: AssembledModel, cfg: TrainConfig, rank: int) -> int:
    """Freeze what does not train; returns the trainable parameter count."""
    names = apply_freeze(assembled.model, cfg.trainable, lora=cfg.lora is not None)
    params = list(assembled.model.parameters())
    trainable = trainable_parameters(assembled.model)
    # under ZeRO-3 a rank holds ~1/world of each tensor: ds_numel is the whole tensor
    log.info("rank %d: model %.2fM parameters (%.2fM trainable, %d tensors), %.2fM materialised on this rank",
             rank, sum(getattr(p, "ds_numel", p.numel()) for p in params) / 1e6, trainable / 1e6, len(names),
             sum(p.numel() for p in params) / 1e6)
    return trainable


def _open_tracker(cfg: TrainConfig, run: RunFolder, rank: int, world: int, state: TrainState,
                  trainable: int, attention: dict[str, str]) -> Tracker:
    tracking = cfg.tracking if cfg.tracking.run_name else dataclasses.replace(
        cfg.tracking, run_name=f"{cfg.stage}-{run.path.resolve().name}")  # not MLflow's random name
    # model.attn_implementation may say "auto": the params name what each tower really runs
    params = {**flatten(cfg), "trainable_parameters": trainable,
              **{f"attention/{tower}": name for tower, name in attention.items()}}
    tracker = Tracker.open(tracking, run.path, is_main=rank == 0, run_id=state.run_id, resume_step=state.step,
                           params=params, tags={"stage": cfg.stage, "world_size": str(world)})
    if rank == 0:
        state.run_id = tracker.run_id  # rank 0's is the one its checkpoint files carry
    return tracker


def _write_run_files(cfg: TrainConfig, run: RunFolder, tracker: Tracker, ds_config: dict, fresh: bool) -> None:
    dump_yaml(cfg, run.config)
    run.deepspeed_config.write_text(json.dumps(ds_config, indent=2))
    if fresh:
        tracker.log_artifact(run.config)
        tracker.log_artifact(run.deepspeed_config)
        print(f"[{cfg.stage}] MLflow: {tracker.ui_command or tracker.run_url}", flush=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
