"""`sbatch launch/stage1.sh` on a real (loopback) Slurm cluster: the time-limit warning makes the job
checkpoint, requeue itself and resume; the MLflow run continues on one step axis."""
from __future__ import annotations

import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import write_training_shards
from tests.slurm_cluster import ensure_slurm_installed, slurm_cluster
from tests.stage_runner import REPO, consumed_keys, metrics_by_step, stage_env, stage_overrides

pytestmark = pytest.mark.slow
STEPS = 60


def test_sbatch_stage1_checkpoints_on_warning_requeues_and_finishes(tiny_world, tmp_path):
    reason = ensure_slurm_installed()
    if reason:
        pytest.skip(f"no Slurm test cluster on this machine: {reason}")
    shards = write_training_shards(tiny_world, tmp_path / "shards", samples=2 * 2 * STEPS, per_shard=20)
    run = tmp_path / "run"
    overrides = stage_overrides(tiny_world, shards, run, **{
        "loader.batch_size": 2, "max_steps": STEPS, "checkpoint.every_steps": 1000,
        "tracking.plot_every_steps": 0})
    with slurm_cluster(tmp_path / "slurm", cpus=2, gpus=2) as cluster:
        job = cluster.sbatch(
            REPO / "launch" / "stage1.sh", *overrides, cwd=REPO,
            # the header asks for 8 GPUs and a day; this node has 2 (fake) GPUs
            options=["--gpus-per-node=2", "--cpus-per-gpu=1", "--time=15",
                     f"--output={tmp_path / 'job.out'}"],
            env=stage_env(CONFIG="configs/tiny/stage1.yaml", CPU_RANKS="2", PYTHON=sys.executable))
        # What `--signal=B:USR1@<grace>` does before the time limit, sent once training runs: slurmctld
        # checks the limits only every 30 s, so a time-based warning could land after a fast run ends.
        deadline = time.monotonic() + 400
        while not _steps_done(run) >= 3:
            state = cluster.job_state(job)
            assert state in {"PENDING", "RUNNING"}, \
                f"job {job} {state} before the warning:\n{(tmp_path / 'job.out').read_text()[-4000:]}"
            assert time.monotonic() < deadline, (tmp_path / "job.out").read_text()[-4000:]
            time.sleep(0.2)
        cluster.run("scancel", "--batch", "--signal=USR1", job)
        while cluster.restart_count(job) == 0:
            state = cluster.job_state(job)
            assert state not in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, \
                f"job {job} {state} before requeue:\n{(tmp_path / 'job.out').read_text()[-4000:]}"
            assert time.monotonic() < deadline, (tmp_path / "job.out").read_text()[-4000:]
            time.sleep(0.5)
        state = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout_s=600)
        log = (tmp_path / "job.out").read_text()
        assert state == "COMPLETED", log[-4000:]
        assert cluster.restart_count(job) == 1

    assert "USR1/TERM: asking ranks to checkpoint" in log
    assert "preemption signal: checkpointed step" in log and "resumed at step" in log
    assert log.count("(restart 0)") == 1 and log.count("(restart 1)") == 1  # --open-mode=append
    assert sorted(metrics_by_step(run)) == list(range(1, STEPS + 1))
    keys = [k for rank in (0, 1) for ks in consumed_keys(run, rank).values() for k in ks]
    assert len(keys) == len(set(keys)) == STEPS * 2 * 2
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    assert {m.step for m in client.get_metric_history(runs[0].info.run_id, "lm")} == set(range(1, STEPS + 1))


def _steps_done(run) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def test_deepspeed_slurm_launcher_runs_the_launch_script_as_srun_tasks(tiny_world, tmp_path):
    """`deepspeed --launcher slurm --hostfile H launch/stage1.sh` inside an allocation: DeepSpeed
    starts `srun -n <slots> python -u launch/stage1.sh`, whose Python part maps Slurm's task ids to ranks."""
    reason = ensure_slurm_installed()
    if reason:
        pytest.skip(f"no Slurm test cluster on this machine: {reason}")
    shards = write_training_shards(tiny_world, tmp_path / "shards", samples=16, per_shard=4)
    run = tmp_path / "run"
    overrides = stage_overrides(tiny_world, shards, run, **{"loader.batch_size": 2, "max_steps": 2,
                                                             "tracking.plot_every_steps": 0})
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nset -euo pipefail\n"
                      f"{sys.executable} -m deepspeed.launcher.runner --launcher slurm --force_multi "
                      f"--no_ssh_check --hostfile {tmp_path / 'hostfile'} --master_addr localhost "
                      "launch/stage1.sh " + " ".join(f"'{o}'" for o in overrides) + "\n")
    with slurm_cluster(tmp_path / "slurm", cpus=2) as cluster:
        job = cluster.sbatch(script, cwd=REPO, options=["--ntasks=2", f"--output={tmp_path / 'job.out'}"],
                             env=stage_env(CONFIG="configs/tiny/stage1.yaml"))
        state = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout_s=600)
    log = (tmp_path / "job.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert "srun -n 2" in log
    assert sorted(metrics_by_step(run)) == [1, 2]
    assert all(len(consumed_keys(run, rank)) == 2 for rank in (0, 1)), "both srun tasks trained as ranks"
