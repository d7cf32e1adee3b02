"""Exact resume: a 2-rank ZeRO-3 stage-1 run on a 3:1 mixture of two shard sets streamed from a
loopback HTTP server, stopped by SIGTERM, then killed by SIGKILL after a checkpoint, ends with the
same per-step losses and the same sample keys as an uninterrupted run from the local files."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from pipeline.train.checkpoint import saved_steps
from tests.conftest import write_training_shards
from tests.http_shards import ShardServer
from tests.mlflow_server import free_port
from tests.stage_runner import (REPO, alongside, consumed_keys, metrics_by_step, run_stage, stage_env,
                                stage_overrides, start_stage, tail)

pytestmark = pytest.mark.slow
STEPS = 20
PARTS = ("lm", "align", "pair", "cos_layer/3", "grad_norm", "lr")


@pytest.fixture(scope="module")
def shards(tiny_world, tmp_path_factory):
    """Two sets, `main` (64 samples) and `extra` (32, other records), as local folders."""
    root = tmp_path_factory.mktemp("resume")
    records = json.loads(tiny_world.stage1_json.read_text())
    write_training_shards(tiny_world, root / "main", samples=64, per_shard=8, records=records[:64])
    write_training_shards(tiny_world, root / "extra", samples=32, per_shard=8, records=records[64:96],
                          prefix="extra")
    return root


def mixture(main: str, extra: str) -> str:
    """The 3:1 `data:` list as a command-line override."""
    return f"data=[{{shards: '{main}', weight: 3}}, {{shards: '{extra}', weight: 1}}]"


def overrides(world, data: str, run_dir):
    return [o for o in stage_overrides(world, "-", run_dir, **{
        "loader.batch_size": 2, "max_steps": STEPS, "checkpoint.every_steps": 5,
        "checkpoint.keep_last": 2, "tracking.plot_every_steps": 0}) if not o.startswith("shards=")] + ["shards=null", data]


def start(world, shards, run_dir: Path, log: Path):
    return start_stage("stages.stage1_align", "configs/tiny/stage1.yaml", overrides(world, shards, run_dir),
                       ranks=2, launch_script="stage1.sh", log=log)


def steps_done(run_dir: Path) -> int:
    ledger = run_dir / "samples" / "rank0.jsonl"
    return len(consumed_keys(run_dir, 0)) if ledger.exists() else 0


def wait_for(predicate, proc, log, timeout=400):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}):\n{tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out:\n{tail(log)}")
        time.sleep(0.2)


def reference_beside_a_killed_run(module: str, config: str, overrides, reference: Path, run: Path,
                                  kill_when, launch_script: str) -> None:
    """The uninterrupted reference beside a 2-rank run that is SIGKILLed once `kill_when(run)` holds
    (no chance to save) and then resumed to the end; logs `<folder>.log` beside each run folder."""
    reference_log, log = reference.with_suffix(".log"), run.with_suffix(".log")
    with alongside(start_stage(module, config, overrides(reference), ranks=2, launch_script=launch_script,
                               log=reference_log), reference_log):
        proc = start_stage(module, config, overrides(run), ranks=2, launch_script=launch_script, log=log)
        wait_for(lambda: kill_when(run), proc, log)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        run_stage(module, config, overrides(run), ranks=2, launch_script=launch_script, log=log)


def rank_pid(launcher: psutil.Popen, rank: int) -> int:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        if f"--local_rank={rank}" in " ".join(child.cmdline()):
            return child.pid
    raise AssertionError(f"no process for rank {rank}")


def test_sigterm_then_sigkill_resume_replays_identical_losses_and_samples(tiny_world, shards, tmp_path):
    with ShardServer(shards) as server:
        over_http = mixture(server.url("files", "main"), server.url("files", "extra"))
        interrupted_then_resumed(tiny_world, mixture(shards / "main", shards / "extra"), over_http, tmp_path)


def interrupted_then_resumed(tiny_world, local, over_http, tmp_path):
    # The reference, run beside the interrupted one, also proves `deepspeed launch/stage1.sh` (the
    # launcher runs the script as Python).
    reference, reference_log = tmp_path / "reference", tmp_path / "reference.log"
    with open(reference_log, "wb") as out:
        reference_run = subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                                          "--master_port", str(free_port()), "launch/stage1.sh",
                                          *overrides(tiny_world, local, reference)],
                                         cwd=REPO, env=stage_env(CONFIG="configs/tiny/stage1.yaml"), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
    run, log = tmp_path / "interrupted", tmp_path / "interrupted.log"
    with alongside(reference_run, reference_log, timeout=900):
        # 1. SIGTERM on rank 1 only: both ranks agree at the next step boundary, save the same step, exit 0.
        proc = start(tiny_world, over_http, run, log)
        wait_for(lambda: steps_done(run) >= 7, proc, log)
        os.kill(rank_pid(proc, 1), signal.SIGTERM)
        assert proc.wait(timeout=300) == 0, tail(log)
        stopped_at = saved_steps(run / "checkpoints")[-1]
        assert 7 <= stopped_at < STEPS
        assert sorted(p.name for p in (run / "checkpoints" / f"global_step{stopped_at}").glob("rank_*.pt")) == \
            ["rank_0.pt", "rank_1.pt"]

        # 2. Resume, then SIGKILL everything a random number of steps after the next checkpoint.
        proc = start(tiny_world, over_http, run, log)
        next_ckpt = (stopped_at // 5 + 1) * 5
        kill_after = next_ckpt + random.Random().randint(1, 3)
        wait_for(lambda: next_ckpt in saved_steps(run / "checkpoints") and steps_done(run) >= kill_after, proc, log)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

        # 3. Resume to the end.
        run_stage("stages.stage1_align", "configs/tiny/stage1.yaml", overrides(tiny_world, over_http, run),
                  ranks=2, launch_script="stage1.sh", log=log)

    expected, got = metrics_by_step(reference), metrics_by_step(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in expected:
        for part in PARTS:
            assert got[step][part] == expected[step][part], (step, part)  # bit-identical on CPU
    for rank in (0, 1):
        assert consumed_keys(run, rank) == consumed_keys(reference, rank), f"rank {rank} sample order"
    keys = [k for rank in (0, 1) for step_keys in consumed_keys(run, rank).values() for k in step_keys]
    assert len(keys) == len(set(keys)) == STEPS * 2 * 2, "a sample was lost or seen twice"

    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, "a resumed job must append to the same MLflow run"
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "lm")}
    assert steps == set(range(1, STEPS + 1))
    # per-set sample counts continue across the resume: the last step's equal the ledgers' keys
    final = runs[0].data.metrics
    extra = sum(k.startswith("extra_") for k in keys)
    assert (final["data/main/samples"], final["data/extra/samples"]) == (len(keys) - extra, extra)
    assert 0.15 < extra / len(keys) < 0.35, "a 3:1 mixture"
