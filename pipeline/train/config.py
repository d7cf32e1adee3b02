"""The training-stage config (stage 1 and stage 2 share it; their YAML files differ)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from pipeline.config import InputPath
from pipeline.data.loader import LoaderConfig
from pipeline.data.sources import DatasetConfig
from pipeline.model.assemble import ModelConfig
from pipeline.model.lora import LoraConfig
from pipeline.tga.loss import TGAConfig
from pipeline.train.checkpoint import CheckpointConfig
from pipeline.train.tracking import TrackingConfig


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    template: str = "tokenizer"      # see pipeline/tga/templates.py: tokenizer, llama2, vicuna_v1, plain
    insert_retrieved: bool = True    # "Retrieved Text: {text}. <image>" (reference stage 1: False)
    max_tokens: int = 2048


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.03
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    # How long a collective may wait before the process group's watchdog kills the job. torch's
    # default (10 min) is shorter than the barrier after a 7B stage-2 save (~87 GB) on a busy shared
    # filesystem, or a rank reading a slow first shard.
    timeout_minutes: float = 60.0

    def __post_init__(self):
        if self.timeout_minutes <= 0:
            raise ValueError(f"distributed.timeout_minutes must be > 0, got {self.timeout_minutes}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    stage: Literal["stage1", "stage2"]
    run_dir: Path
    model: ModelConfig
    # The training data: one shard set (a folder, a URL prefix or a brace-expanded URL list; see
    # pipeline/data/sources.py) or `data:`, a weighted mixture [{shards, weight, name, manifest}, …]
    shards: str | None = None
    data: list[DatasetConfig] = dataclasses.field(default_factory=list)
    deepspeed_config: InputPath = Path("configs/deepspeed/zero3.json")
    trainable: list[str] = dataclasses.field(default_factory=lambda: ["projector"])
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    tga: TGAConfig = dataclasses.field(default_factory=TGAConfig)
    # Where TGA's caption targets come from: "in_row" = the caption inputs are segments of the packed
    # rows, so the multimodal forward gives them (no second ZeRO-3 gather of the model per step);
    # "separate" = a no-grad text-only forward up to the deepest alignment layer (eval mode, cacheable
    # in stage 1); "auto" = in_row for packed batches when the LLM trains and nothing in it drops out
    # (stage 2), else separate (pipeline/train/plan.py decides; step.py: captions_in_row gives the trade).
    caption_forward: Literal["auto", "in_row", "separate"] = "auto"
    loader: LoaderConfig = dataclasses.field(default_factory=LoaderConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    # LoRA adapters on the LLM (stage 2 on smaller nodes); None: the parts in `trainable` train fully
    lora: LoraConfig | None = None
    epochs: int = 1
    max_steps: int | None = None          # optimizer steps; None = epochs × batches per epoch
    seed: int = 0
    log_every_steps: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Signals that mean "checkpoint at the next step boundary and exit 0" (Slurm: --signal=B:USR1@…).
    preemption_signals: list[str] = dataclasses.field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # Peak dense TFLOP/s of one device for the logged MFU; None: known CUDA devices (A100, H100,
    # H200, ...) by name, no MFU elsewhere. See pipeline/train/flops.py for what counts as model FLOPs.
    peak_tflops: float | None = None

    @property
    def datasets(self) -> list[DatasetConfig]:
        return self.data or [DatasetConfig(shards=self.shards)]

    def __post_init__(self):
        if self.shards is not None:
            object.__setattr__(self, "shards", str(self.shards))  # a Path from Python callers
        if (self.shards is None) == (not self.data):
            raise ValueError("name the training data once: shards=<folder or URLs> for one set, or a "
                             "data: list of {shards, weight} for a mixture (over a config file that sets "
                             "the other one, add shards=null or data=[])")
        names = [d.label for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"data: two sets are both called {sorted(n for n in names if names.count(n) > 1)[0]!r}; "
                             "give each its own name: key")
        if self.lora is not None and "llm" in self.trainable:
            raise ValueError("lora trains adapters on a frozen LLM: remove 'llm' from trainable "
                             "(e.g. trainable=[projector]) or drop the lora section for full training")
        if self.tga.enabled and self.caption_forward == "in_row" and not self.loader.packing:
            raise ValueError("caption_forward=in_row puts the caption inputs in packed rows: set loader.packing=true "
                             "(or caption_forward=auto)")
        if self.optim.grad_accum < 1 or self.loader.batch_size < 1:
            raise ValueError("optim.grad_accum and loader.batch_size must be >= 1")
