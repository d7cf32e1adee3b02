"""Run training stages as real processes (1 rank: python -m; N ranks: the launch script)."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.mlflow_server import free_port

REPO = Path(__file__).resolve().parent.parent


def stage_overrides(world, shards: Path, run_dir: Path, **extra) -> list[str]:
    values = {"run_dir": run_dir, "shards": shards, "model.llm": world.llm,
              "model.vision_tower": world.clip, "loader.num_workers": 0, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def stage_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCHDYNAMO_DISABLE="1",  # DeepSpeed imports inductor at start-up (seconds per rank); unused here
               MASTER_PORT=str(free_port()), **extra)
    return env


def start_stage(module: str, config: str, overrides: list[str], *, ranks: int, log: Path,
                launch_script: str | None = None) -> subprocess.Popen:
    """ranks == 1: `python -m module`; else `bash launch/<script>` with CPU_RANKS=ranks."""
    if ranks == 1:
        cmd = [sys.executable, "-m", module, "--config", config, *overrides]
        env = stage_env()
    else:
        cmd = ["bash", str(REPO / "launch" / launch_script), *overrides]
        env = stage_env(CONFIG=config, CPU_RANKS=str(ranks), PYTHON=sys.executable)
    out = open(log, "ab")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def run_stage(*args, timeout: float = 600, **kwargs) -> subprocess.Popen:
    return finish_stage(start_stage(*args, **kwargs), kwargs["log"], timeout=timeout)


def finish_stage(proc: subprocess.Popen, log: Path, timeout: float = 600) -> subprocess.Popen:
    """Wait for a started stage (killed past `timeout`, a hang guard); it must exit 0."""
    try:
        proc.wait(timeout=timeout)
    finally:
        _kill(proc)
    if proc.returncode != 0:
        raise AssertionError(f"stage exited {proc.returncode}; log tail:\n{tail(log)}")
    return proc


@contextlib.contextmanager
def alongside(proc: subprocess.Popen, log: Path, timeout: float = 600) -> Iterator[subprocess.Popen]:
    """The block runs while `proc` does: a started stage independent of the block's runs (an
    uninterrupted reference beside the interrupted run). At the end of the block it must exit 0
    (finish_stage); if the block fails it is killed. A run's start-up and exit keep about one of
    the 2 cores busy, so two runs side by side take much less than one after the other."""
    try:
        yield proc
    except BaseException:
        _kill(proc)
        raise
    finish_stage(proc, log, timeout)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 9)
        proc.wait()


def tail(path: Path, lines: int = 60) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def metrics_by_step(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    by_step = {row["step"]: row for row in rows}
    assert len(by_step) == len(rows), "metrics.jsonl repeats a step"
    return by_step


def consumed_keys(run_dir: Path, rank: int) -> dict[int, list[str]]:
    """Sample keys per optimizer step on one rank, from the run's sample ledger."""
    steps: dict[int, list[str]] = {}
    for line in (Path(run_dir) / "samples" / f"rank{rank}.jsonl").read_text().splitlines():
        row = json.loads(line)
        steps.setdefault(row["step"], []).extend(row["keys"])
    return steps
