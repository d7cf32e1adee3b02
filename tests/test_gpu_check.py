"""bench/gpu_check: the wrapper steps aside without a GPU, and the check itself runs end to end at toy size
on CPU (SDPA, fp32, a gloo world of one) through the same code the GPU run takes."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NUMBER = r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?)"
TIMEOUT_SECONDS = 300  # ~20 s on an idle 2-core machine; the rest is for a loaded one


def _has_gpu() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _world_of_one_env() -> dict[str, str]:
    """This process's environment without a launcher's rank variables: the check is a world of one."""
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                "OMPI_COMM_WORLD_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU: the wrapper would run the real check")
def test_wrapper_without_gpu_prints_why_and_exits_0():
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], cwd=REPO, env=_world_of_one_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no NVIDIA GPU here" in done.stdout and "nothing to check" in done.stdout
    assert "--device cpu --tiny" in done.stdout  # it says how to run the same steps on CPU


def test_tiny_cpu_check_trains_both_stages_prints_every_variant_and_packed_equals_padded():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--steps", "1", "--warmup", "0"],
                          cwd=REPO, env=_world_of_one_env(), capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
    assert re.search(r"^python \S+ \| torch \S+ \| deepspeed \S+ \| transformers \S+ \| flash-attn .+$", out, re.M)
    stages = re.split(r"^== stage \d: ", out, flags=re.M)[1:]
    assert [s.split(";")[0] for s in stages] == ["configs/stage1.yaml", "configs/stage2.yaml"], out
    for stage, trains in zip(stages, ("projector", "projector + llm")):
        assert f"trains {trains}:" in stage
        assert "sdpa, float32, ZeRO-3, 1 rank" in stage
        for part in ("loss", "lm", "align", "pair"):
            for layout in ("packed", "captions in row"):
                padded, packed, _ = (float(x) for x in re.search(
                    rf"^  {part}\s+padded\s+{NUMBER}\s+{layout}\s+{NUMBER}\s+\|diff\| {NUMBER}\s+ok$", stage,
                    re.M).groups())
                assert packed == pytest.approx(padded, rel=1e-4, abs=1e-5)
        assert "  packed = padded: yes" in stage
        for variant in ("padded, TGA", "padded, plain", "packed, TGA", "captions in row, TGA", "packed, plain"):
            row = re.search(rf"^{re.escape(variant)}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+n/a\s+n/a$", stage, re.M)
            assert row, f"no table row for {variant!r} in:\n{stage}"
            seconds, tokens_per_second, tflops = (float(x) for x in row.groups())
            assert seconds > 0 and tokens_per_second > 0 and tflops > 0
        assert re.search(rf"^memory plan \(pipeline/train/memory.py\): {NUMBER} GiB without its 3 GiB reserve; "
                         r"measured peak n/a \(CPU\)$", stage, re.M), stage
    assert re.search(r"^packed = padded \(every loss part, same weights\) in stage 1 and stage 2: yes$", out, re.M)
