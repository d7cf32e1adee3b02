"""`sbatch -N 2 launch/stage1.sh` on a real (loopback) two-node Slurm cluster: ranks and master come
from the allocation, the warning signal makes every rank checkpoint the same step, the job requeues
itself and resumes; the MLflow run continues on one step axis."""
from __future__ import annotations

import json
import re
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import write_training_shards
from tests.slurm_cluster import ensure_slurm_installed, slurm_cluster
from tests.stage_runner import REPO, consumed_keys, metrics_by_step, stage_env, stage_overrides

pytestmark = pytest.mark.slow
NODES, RANKS_PER_NODE, BATCH = 2, 2, 2
WORLD = NODES * RANKS_PER_NODE
# The warning comes once step 1 is logged; the ranks stop at the next step boundary where their
# all-reduce sees it (step 1 or 2 here). The later steps leave room for a slow signal and are what
# the resume must train.
STEPS = 8
# Each srun task says where Slurm put it, then runs the Python the launch script asked for.
TASK_WRAPPER = """#!/bin/sh
echo "[task] rank $SLURM_PROCID (local $SLURM_LOCALID) on node $SLURM_NODEID ($SLURMD_NODENAME)"
exec {python} "$@"
"""


def test_sbatch_on_two_nodes_checkpoints_every_rank_on_warning_requeues_and_resumes(tiny_world, tmp_path):
    reason = ensure_slurm_installed()
    if reason:
        pytest.skip(f"no Slurm test cluster on this machine: {reason}")
    shards = write_training_shards(tiny_world, tmp_path / "shards", samples=WORLD * BATCH * STEPS,
                                   per_shard=BATCH * STEPS)
    run, out = tmp_path / "run", tmp_path / "job.out"
    overrides = stage_overrides(tiny_world, shards, run, **{
        "loader.batch_size": BATCH, "max_steps": STEPS, "checkpoint.every_steps": 1000,
        "tracking.plot_every_steps": 0})
    python = tmp_path / "python"
    python.write_text(TASK_WRAPPER.format(python=sys.executable))
    python.chmod(0o755)
    with slurm_cluster(tmp_path / "slurm", cpus=RANKS_PER_NODE, gpus=RANKS_PER_NODE, nodes=NODES) as cluster:
        job = cluster.sbatch(
            REPO / "launch" / "stage1.sh", *overrides, cwd=REPO,
            # the header asks for one node with 8 GPUs for a day; each node here has 2 (fake) GPUs
            options=[f"--nodes={NODES}", f"--ntasks-per-node={RANKS_PER_NODE}",
                     f"--gpus-per-node={RANKS_PER_NODE}", "--cpus-per-gpu=1", "--time=15", f"--output={out}"],
            env=stage_env(CONFIG="configs/tiny/stage1.yaml", CPU_RANKS=str(RANKS_PER_NODE), PYTHON=str(python)))
        # What `--signal=B:USR1@<grace>` does before the time limit, sent once training runs: slurmctld
        # checks the limits only every 30 s, so a time-based warning could land after a fast run ends.
        deadline = time.monotonic() + 600  # a hang guard: the waits are on the job's files and state
        while _steps_done(run) < 1:
            state = cluster.job_state(job)
            assert state in {"PENDING", "RUNNING"}, f"job {job} {state} before the warning:\n{_tail(out)}"
            assert time.monotonic() < deadline, _tail(out)
            time.sleep(0.2)
        cluster.run("scancel", "--batch", "--signal=USR1", job)
        while cluster.restart_count(job) == 0:
            state = cluster.job_state(job)
            assert state not in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, \
                f"job {job} {state} before requeue:\n{_tail(out)}"
            assert time.monotonic() < deadline, _tail(out)
            time.sleep(0.5)
        state = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout_s=600)
        log = out.read_text()
        assert state == "COMPLETED", log[-4000:]
        assert cluster.restart_count(job) == 1
        first, second = cluster.nodes

    assert log.count("(restart 0)") == 1 and log.count("(restart 1)") == 1, log[-4000:]  # --open-mode=append
    first_run, resumed_run = log.split("(restart 1)")
    assert f"(restart 0): {NODES} node(s) x {RANKS_PER_NODE} ranks" in first_run
    assert f"{NODES} node(s) x {RANKS_PER_NODE} ranks" in resumed_run.splitlines()[0]
    # srun's block layout: ranks 0-1 on the first node, 2-3 on the second; the master is the first
    placement = [(0, 0, 0, first), (1, 1, 0, first), (2, 0, 1, second), (3, 1, 1, second)]
    for text in (first_run, resumed_run):
        assert _task_placement(text) == placement, text[-4000:]
        assert f"[launch] rank 0 of {WORLD}, master {first}:" in text
    assert "USR1/TERM: asking ranks to checkpoint" in first_run
    checkpointed = dict(re.findall(r"rank (\d+): preemption signal: checkpointed step (\d+)", first_run))
    assert sorted(checkpointed) == [str(r) for r in range(WORLD)], first_run[-4000:]
    steps = set(checkpointed.values())
    assert len(steps) == 1, f"ranks checkpointed different steps: {checkpointed}"
    step = int(steps.pop())
    assert 1 <= step < STEPS, f"checkpointed step {step}: the warning came too late to test a resume"
    saved = run / "checkpoints" / f"global_step{step}"
    assert json.loads((saved / "COMPLETE").read_text())["world_size"] == WORLD
    assert sorted(p.name for p in saved.glob("rank_*.pt")) == [f"rank_{r}.pt" for r in range(WORLD)]
    assert sorted(re.findall(rf"rank (\d+) resumed at step {step} ", resumed_run)) == \
        [str(r) for r in range(WORLD)], resumed_run[-4000:]
    assert sorted(metrics_by_step(run)) == list(range(1, STEPS + 1))
    keys = [k for rank in range(WORLD) for ks in consumed_keys(run, rank).values() for k in ks]
    assert len(keys) == len(set(keys)) == STEPS * WORLD * BATCH
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    assert {m.step for m in client.get_metric_history(runs[0].info.run_id, "lm")} == set(range(1, STEPS + 1))


def _task_placement(log: str) -> list[tuple[int, int, int, str]]:
    """(rank, local rank, node index, node name) of each `[task]` line, sorted."""
    found = re.findall(r"^\[task\] rank (\d+) \(local (\d+)\) on node (\d+) \((\S+)\)$", log, re.M)
    return sorted((int(r), int(local), int(node), name) for r, local, node, name in found)


def _steps_done(run) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def _tail(path, chars: int = 4000) -> str:
    return path.read_text()[-chars:] if path.exists() else f"{path}: (not written yet)"


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
