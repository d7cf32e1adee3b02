"""Shared entry of the training stages: catch preemption signals first, then import and run."""
from __future__ import annotations

import os
import sys

# All three stdlib only: they import in milliseconds.
from pipeline.process_exit import run_as_process
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

    # The DeepSpeed launcher appends --local_rank=N; the rank comes from the environment instead.
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    argv, dry_run_world, gpu = _dry_run_flags(argv)
    cfg = parse_args(TrainConfig, argv, usage="[--dry-run [--world-size N] [--gpu NAME]]")
    if cfg.stage != stage:
        raise SystemExit(f"config has stage '{cfg.stage}', but this entry point runs '{stage}'")
    from pipeline.train.dry_run import dry_run, preflight

    # every rank checks alike (same files); rank 0 says what is wrong, in one line per problem
    world = dry_run_world if dry_run_world is not None else int(os.environ["WORLD_SIZE"])
    problems = dry_run(cfg, world, gpu) if dry_run_world is not None else preflight(cfg, world)
    if problems:
        if dry_run_world is not None or os.environ["RANK"] == "0":
            for problem in problems:
                print(f"[{'dry-run' if dry_run_world is not None else cfg.stage}] {problem}", file=sys.stderr,
                      flush=True)
        raise SystemExit(1)
    _warn_on_shared_memory(cfg, dry_run_world)
    if dry_run_world is not None:
        raise SystemExit(0)
    _train_rank(cfg, preemption)


def _train_rank(cfg, early: PreemptionFlag) -> None:
    """This rank's run: logging, the preemption flag for the configured signals, the loop, one
    line for a data error (the launcher, or srun --kill-on-bad-exit, stops the other ranks), the
    process group left together, the exit code."""
    import logging

    from pipeline.data.shards import ShardFormatError, ShardReadError, data_error_line
    from pipeline.train.distributed import shutdown
    from pipeline.train.loop import train
    from pipeline.train.preemption import flag_for

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    preemption = flag_for(cfg.preemption_signals, early)
    try:
        code = train(cfg, preemption)
    except (ShardReadError, ShardFormatError) as err:
        print(f"[{cfg.stage}] rank {os.environ.get('RANK', '0')}: {data_error_line(err)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    preemption.ignore_from_now()  # finished or checkpointed: a late signal must not fail the job
    shutdown()
    raise SystemExit(code)


def _warn_on_shared_memory(cfg, dry_run_world: int | None) -> None:
    """Each node's first rank checks its own /dev/shm (a dry run: this machine's, for one node)."""
    from pipeline.train.launch_env import ranks_on_this_node
    from pipeline.train.shared_memory import shared_memory_warning

    if dry_run_world is None and os.environ.get("LOCAL_RANK", "0") != "0":
        return
    ranks = dry_run_world if dry_run_world is not None else ranks_on_this_node()
    warning = shared_memory_warning(cfg, ranks)
    if warning:
        print(f"[{'dry-run' if dry_run_world is not None else cfg.stage}] warning: {warning}", file=sys.stderr,
              flush=True)


def _dry_run_flags(argv: list[str]) -> tuple[list[str], int | None, str | None]:
    """(the other arguments, the world size to check for or None without --dry-run, the GPU to plan
    memory for). `--world-size N` defaults to this process's WORLD_SIZE (1 for a plain python -m)."""
    if "--dry-run" not in argv:
        return argv, None, None
    argv = [a for a in argv if a != "--dry-run"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    values = {}
    for flag, example in (("--world-size", "16"), ("--gpu", "h100-80gb")):
        if flag in argv:
            at = argv.index(flag)
            if at + 1 >= len(argv):
                raise SystemExit(f"{flag} needs a value, e.g. {flag} {example}")
            values[flag] = argv[at + 1]
            del argv[at:at + 2]
    if "--world-size" in values:
        try:
            world = int(values["--world-size"])
        except ValueError:
            raise SystemExit("--world-size needs the number of ranks to check for, e.g. --world-size 16") from None
    return argv, world, values.get("--gpu")


def run_from_launch_script(stage: str, default_config: str) -> None:
    """The Python side of launch/stage*.sh, which the DeepSpeed launcher runs as
    `python -u launch/stageN.sh [--local_rank=N] ...` (`deepspeed --launcher slurm`: as srun tasks);
    CONFIG selects the config as in bash. Ends the process (pipeline/process_exit.py)."""
    argv = sys.argv[1:]
    if "--config" not in argv:
        argv = ["--config", os.environ.get("CONFIG", default_config), *argv]
    run_as_process(lambda: run_training_stage(stage, argv))
