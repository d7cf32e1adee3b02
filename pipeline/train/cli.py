"""Shared entry of the training stages: catch preemption signals first, then import and run."""
from __future__ import annotations

import sys

from pipeline.train.preemption import PreemptionFlag  # stdlib only: imports in milliseconds


def run_training_stage(stage: str, argv: list[str] | None = None) -> None:
    # Catch preemption signals before the heavy imports and the model load, which take long
    # enough under load for a Slurm warning to arrive (and kill us with the default action).
    preemption = PreemptionFlag()
    from pipeline.config import parse_args
    from pipeline.train.config import TrainConfig
    from pipeline.train.loop import main

    # The DeepSpeed launcher appends --local_rank=N; the rank comes from the environment instead.
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    cfg = parse_args(TrainConfig, argv)
    if cfg.stage != stage:
        raise SystemExit(f"config has stage '{cfg.stage}', but this entry point runs '{stage}'")
    main(cfg, preemption)
