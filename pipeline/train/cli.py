"""Shared entry of the training stages: catch preemption signals first, then import and run."""
from __future__ import annotations

import os
import sys

# Both stdlib only: they import in milliseconds.
from pipeline.train.launch_env import LaunchEnvError, apply_rank_environment
from pipeline.train.preemption import PreemptionFlag


def run_training_stage(stage: str, argv: list[str] | None = None) -> None:
    # Catch preemption signals before the heavy imports and the model load, which take long
    # enough under load for a Slurm warning to arrive (and kill us with the default action).
    preemption = PreemptionFlag()
    # The one place a launcher's variables (srun's SLURM_*, Open MPI's, torchrun's or DeepSpeed's
    # RANK) become RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, which init_distributed reads.
    try:
        apply_rank_environment()
    except LaunchEnvError as error:
        raise SystemExit(f"launch environment: {error}") from None
    from pipeline.config import parse_args
    from pipeline.train.config import TrainConfig
    from pipeline.train.loop import main

    # The DeepSpeed launcher appends --local_rank=N; the rank comes from the environment instead.
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    cfg = parse_args(TrainConfig, argv)
    if cfg.stage != stage:
        raise SystemExit(f"config has stage '{cfg.stage}', but this entry point runs '{stage}'")
    main(cfg, preemption)


def run_from_launch_script(stage: str, default_config: str) -> None:
    """The Python side of launch/stage*.sh, which the DeepSpeed launcher runs as
    `python -u launch/stageN.sh [--local_rank=N] ...` (`deepspeed --launcher slurm`: as srun tasks);
    CONFIG selects the config as in bash."""
    argv = sys.argv[1:]
    if "--config" not in argv:
        argv = ["--config", os.environ.get("CONFIG", default_config), *argv]
    run_training_stage(stage, argv)
