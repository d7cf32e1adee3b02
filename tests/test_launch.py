"""`deepspeed launch/stage1.sh` works: the launch script is also a Python program (bash/Python polyglot)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import write_training_shards
from tests.mlflow_server import free_port
from tests.stage_runner import REPO, consumed_keys, metrics_by_step, stage_env, stage_overrides, tail

pytestmark = pytest.mark.slow


def test_launch_script_is_bash_and_python():
    bash = subprocess.run(["bash", "-n", str(REPO / "launch" / "stage1.sh")], capture_output=True, text=True)
    assert bash.returncode == 0, bash.stderr
    compile((REPO / "launch" / "stage1.sh").read_text(), "stage1.sh", "exec")  # valid Python too


def test_deepspeed_launcher_runs_the_launch_script_on_every_rank(tiny_world, tmp_path):
    shards = write_training_shards(tiny_world, tmp_path / "shards", samples=16, per_shard=4)
    run = tmp_path / "run"
    overrides = stage_overrides(tiny_world, shards, run, **{"loader.batch_size": 2, "max_steps": 2,
                                                             "tracking.plot_every_steps": 0})
    log = tmp_path / "launch.log"
    # `deepspeed launch/stage1.sh`: the launcher runs `python -u launch/stage1.sh --local_rank=N`.
    # (Multi-node --hostfile needs pdsh/ssh between nodes, as always with DeepSpeed's launcher.)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
           "--master_port", str(free_port()), "launch/stage1.sh", *overrides]
    with open(log, "wb") as out:
        done = subprocess.run(cmd, cwd=REPO, env=stage_env(CONFIG="configs/tiny/stage1.yaml"),
                              stdout=out, stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, tail(log)
    assert sorted(metrics_by_step(run)) == [1, 2]
    assert all(len(consumed_keys(run, rank)) == 2 for rank in (0, 1)), "both ranks trained"
