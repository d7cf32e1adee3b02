"""Shared entry of the training stages: catch preemption signals first, then import and run."""
from __future__ import annotations

import os
import subprocess
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


def run_from_launch_script(stage: str, default_config: str) -> None:
    """The Python side of launch/stage*.sh, which the DeepSpeed launcher runs as
    `python -u launch/stageN.sh [--local_rank=N] ...`; CONFIG selects the config as in bash."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # `deepspeed --launcher slurm`: srun tasks
        os.environ.update(RANK=os.environ["SLURM_PROCID"], LOCAL_RANK=os.environ["SLURM_LOCALID"],
                          WORLD_SIZE=os.environ["SLURM_NTASKS"])
        nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_STEP_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        os.environ.setdefault("MASTER_ADDR", nodes[0])
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000))
    argv = sys.argv[1:]
    if "--config" not in argv:
        argv = ["--config", os.environ.get("CONFIG", default_config), *argv]
    run_training_stage(stage, argv)
