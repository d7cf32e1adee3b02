"""The launch scripts are bash and Python at once, so `deepspeed launch/stage1.sh` works (run for real
by tests/test_resume.py's reference run; `bash launch/stage1.sh` by the other stage tests)."""
from __future__ import annotations

import subprocess

import pytest

from tests.stage_runner import REPO


@pytest.mark.parametrize("script", ["stage1.sh", "stage2.sh"])
def test_launch_script_is_valid_bash_and_valid_python(script):
    bash = subprocess.run(["bash", "-n", str(REPO / "launch" / script)], capture_output=True, text=True)
    assert bash.returncode == 0, bash.stderr
    compile((REPO / "launch" / script).read_text(), script, "exec")
