"""The launch scripts are bash and Python at once, so `deepspeed launch/stage1.sh` works (run for real
by tests/test_resume.py's reference run; `bash launch/stage1.sh` by the other stage tests)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.stage_runner import REPO, stage_env


@pytest.mark.parametrize("script", ["stage1.sh", "stage2.sh"])
def test_launch_script_is_valid_bash_and_valid_python(script):
    bash = subprocess.run(["bash", "-n", str(REPO / "launch" / script)], capture_output=True, text=True)
    assert bash.returncode == 0, bash.stderr
    compile((REPO / "launch" / script).read_text(), script, "exec")


@pytest.mark.parametrize("flag", ["--help", "--print-config"])
def test_help_and_print_config_answer_once_through_the_launcher(flag, tiny_world, tmp_path):
    """Through DeepSpeed's launcher every rank would print them (the help came twice on 2 CPU ranks).
    The model folders are the tiny world's: a fresh clone has no work/ for the tiny config to name."""
    overrides = [f"model.llm={tiny_world.llm}", f"model.vision_tower={tiny_world.clip}", f"shards={tmp_path}"]
    done = subprocess.run(["bash", str(REPO / "launch" / "stage1.sh"), flag, *overrides], cwd=REPO,
                          env=stage_env(CONFIG="configs/tiny/stage1.yaml", CPU_RANKS="2", PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    marker = "loader.batch_size: int = 4" if flag == "--help" else "stage: stage1"
    assert done.stdout.count(marker) == 1, done.stdout
    assert "deepspeed.launcher" not in done.stderr
