"""The run's size and caption plan: which shard sets it reads, how many optimizer steps it runs, and
where TGA's caption targets come from. The builder (job.py), the preflight (dry_run.py) and the
memory plan (memory.py) read it from here; nothing here loads weights or starts a process group.

What trains decides the caption plan, and each question has one answer, here:
- `llm_weights_train`: the LLM's own weights train (`trainable: [..., llm]`, stage 2);
- `adapters_train`: LoRA adapters on the frozen LLM train (`lora:`);
- `caption_targets_can_be_cached`: neither, so a sample's caption targets never change in the run
  (stage 1) and the separate caption forward's results may be kept per sample.
"""
from __future__ import annotations

import dataclasses

import torch

from pipeline.data.loader import batches_per_epoch
from pipeline.data.sources import ShardSet, resolve_all
from pipeline.train.config import TrainConfig
from pipeline.train.step import captions_in_row


def llm_weights_train(cfg: TrainConfig) -> bool:
    return "llm" in cfg.trainable


def adapters_train(cfg: TrainConfig) -> bool:
    return cfg.lora is not None


def caption_targets_can_be_cached(cfg: TrainConfig) -> bool:
    """The caption targets are a function of the LLM's weights and adapters: fixed when neither trains."""
    return not (llm_weights_train(cfg) or adapters_train(cfg))


def shard_sets(cfg: TrainConfig) -> list[ShardSet]:
    """The config's data sets, resolved from their manifests (once per process: resolve_all caches)."""
    return resolve_all(tuple(cfg.datasets), cfg.loader.read_timeout_s)


@dataclasses.dataclass(frozen=True)
class RunPlan:
    shard_sets: list[ShardSet]
    steps_per_epoch: int   # optimizer steps of one pass: the slowest rank's full batches / grad_accum
    total_steps: int       # what sizes the LR schedule: `max_steps`, else epochs × steps_per_epoch

    @property
    def meets_a_sample_twice(self) -> bool:
        return self.total_steps > self.steps_per_epoch


def run_plan(cfg: TrainConfig, world_size: int) -> RunPlan:
    sets = shard_sets(cfg)
    per_epoch = batches_per_epoch(sets, world_size, cfg.loader) // cfg.optim.grad_accum
    return RunPlan(sets, per_epoch, cfg.max_steps or cfg.epochs * per_epoch)


def caption_targets_in_rows(cfg: TrainConfig, model: torch.nn.Module) -> bool:
    """Whether the caption inputs ride as segments of the packed rows (`caption_forward`, decided by
    pipeline/train/step.py: captions_in_row); `model`: the Llava as it trains (or its meta-device
    skeleton), whose dropout rules the row out."""
    return cfg.tga.enabled and captions_in_row(cfg.caption_forward, packed=cfg.loader.packing,
                                               llm_trains=not caption_targets_can_be_cached(cfg), model=model)


@dataclasses.dataclass(frozen=True)
class CaptionPlan:
    in_rows: bool   # from the packed rows of the multimodal forward
    cached: bool    # else a separate forward, whose targets are kept per sample key

    def describe(self) -> str:
        return "from the packed rows" if self.in_rows else "a separate forward" + (", cached" if self.cached else "")


def caption_plan(cfg: TrainConfig, run: RunPlan, model: torch.nn.Module) -> CaptionPlan:
    """The cache serves only samples met before: in a single pass it would hold ~10 GB of host RAM
    per rank (7B, LCS-558K) and copy targets to the host every step for nothing."""
    in_rows = caption_targets_in_rows(cfg, model)
    return CaptionPlan(in_rows, not in_rows and caption_targets_can_be_cached(cfg) and run.meets_a_sample_twice)
