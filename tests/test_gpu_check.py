"""bench/gpu_check: the wrapper steps aside without a GPU, and the check itself runs end to end at toy size
on CPU (SDPA, fp32, a gloo world of one) through the same code the GPU run takes: the attention comparison
(eager standing in for the CUDA-only flash path), packed vs padded, the LoRA steps. bench/gpu_wheelhouse.sh:
its arguments, without downloading anything."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import gpu_check  # noqa: E402
from bench.gpu_check_attention import TOLERANCES, Measured, compare  # noqa: E402
NUMBER = r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?)"
TIMEOUT_SECONDS = 900  # a hang guard: ~40 s on an idle 2-core machine, 300 s seen on a loaded one


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
def test_wrapper_without_gpu_prints_why_and_exits_0_before_looking_for_a_python():
    env = {**_world_of_one_env(), "PYTHON": "/nonexistent/python", "GPU_WHEELHOUSE": "/nonexistent"}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--attention", "both", "--lora"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no NVIDIA GPU here" in done.stdout and "nothing to check" in done.stdout
    assert "gpu_check.sh --attention both --lora" in done.stdout  # the same command, for a GPU node
    assert "--device cpu --tiny" in done.stdout  # and how to run the same steps on CPU


def test_prepare_imports_every_module_the_check_needs_without_a_gpu():
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--prepare"], cwd=REPO,
                          env={**_world_of_one_env(), "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=TIMEOUT_SECONDS)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert re.search(r"^python \S+ \| torch \S+ \| deepspeed \S+ \| transformers \S+", done.stdout, re.M)
    assert f"the check's {len(gpu_check.CHECK_MODULES)} pipeline modules import here; torch sees " in done.stdout


def test_imports_only_lists_every_pipeline_module_the_check_imports():
    imported = set()
    for path in (REPO / "bench").glob("gpu_check*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                # `from pipeline.train import engine` imports the module pipeline.train.engine
                submodules = {f"{node.module}.{a.name}" for a in node.names
                              if (REPO / node.module.replace(".", "/") / f"{a.name}.py").exists()}
                imported.update(submodules or {node.module})
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names if a.name.startswith("pipeline"))
    assert imported and imported <= set(gpu_check.CHECK_MODULES), sorted(imported - set(gpu_check.CHECK_MODULES))


def test_flash_attention_on_cpu_is_refused_with_the_reason(capsys):
    with pytest.raises(SystemExit) as stopped:
        gpu_check.parse_args(["--device", "cpu", "--attention", "flash"])
    assert stopped.value.code == 2
    assert "no CPU version" in capsys.readouterr().err
    assert gpu_check.parse_args(["--device", "cpu"]).attention == "sdpa"
    assert gpu_check.parse_args([]).attention == "both"  # cuda: flash in the stages, compared with SDPA


def _measured(loss: float, grad: list[float]) -> Measured:
    return Measured({"loss": loss, "lm": loss - 1.0, "align": 0.5, "pair": 0.5}, torch.tensor(grad))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_comparison_holds_within_rounding_and_flags_a_part_a_norm_or_a_direction_off(dtype):
    sdpa, tol = _measured(7.0, [3.0, 4.0]), TOLERANCES[dtype]
    verdict = lambda flash: {name: ok for name, *_, ok in compare(flash, sdpa, tol)}  # noqa: E731
    rounding = tol.loss_rtol / 4
    assert all(verdict(_measured(7.0 * (1 + rounding), [3.0, 4.0 * (1 + rounding)])).values())
    assert verdict(_measured(7.0 * (1 + 4 * tol.loss_rtol), [3.0, 4.0])) == {
        "loss": False, "lm": False, "align": True, "pair": True, "projector grad norm": True,
        "projector grad cosine": True}
    longer = verdict(_measured(7.0, [3.0 * (1 + 2 * tol.grad_norm_rtol), 4.0 * (1 + 2 * tol.grad_norm_rtol)]))
    assert not longer["projector grad norm"] and longer["projector grad cosine"]
    turned = verdict(_measured(7.0, [4.0, 3.0]))  # same norm, another direction (cosine 0.96)
    assert turned["projector grad norm"] and not turned["projector grad cosine"]
    assert not verdict(_measured(7.0, [0.0, 0.0]))["projector grad norm"]


def test_fp32_bounds_are_tighter_than_bf16_ones():
    bf16, fp32 = TOLERANCES[torch.bfloat16], TOLERANCES[torch.float32]
    assert fp32.loss_rtol < bf16.loss_rtol and fp32.grad_norm_rtol < bf16.grad_norm_rtol
    assert fp32.min_grad_cosine > bf16.min_grad_cosine


def test_tiny_cpu_check_compares_attention_trains_both_stages_and_lora_and_packed_equals_padded():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--steps", "1", "--warmup", "0", "--attention", "both", "--lora"],
                          cwd=REPO, env=_world_of_one_env(), capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
    assert re.search(r"^python \S+ \| torch \S+ \| deepspeed \S+ \| transformers \S+ \| flash-attn .+$", out, re.M)
    assert "eager stands in for the flash path" in out
    stages = re.split(r"^== (?:stage \d|LoRA): ", out, flags=re.M)[1:]
    assert [s.split(";")[0] for s in stages] == ["configs/stage1.yaml", "configs/stage2.yaml",
                                                 "configs/stage2_lora.yaml"], out
    for stage, trains in zip(stages, ("projector", "projector + llm")):
        assert f"trains {trains}:" in stage
        assert "sdpa, float32, ZeRO-3, 1 rank" in stage
        _assert_eager_equals_sdpa(stage)
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
    _assert_lora_trained(stages[2])
    assert re.search(r"^packed = padded \(every loss part, same weights\) in stage 1 and stage 2: yes$", out, re.M)
    assert re.search(r"^eager = sdpa \(loss parts, projector gradient\) in stage 1 and stage 2: yes$", out, re.M)
    assert re.search(r"^LoRA \(configs/stage2_lora.yaml\): initialised under ZeRO-3, 2 steps, finite losses: yes$",
                     out, re.M)


def _assert_eager_equals_sdpa(stage: str) -> None:
    """Each loss part and the projector gradient's norm printed by both paths, equal within fp32's bounds."""
    assert "eager (packed, one row) vs sdpa (padded), forward + backward on the same weights (float32):" in stage
    for quantity in ("loss", "lm", "align", "pair", "projector grad norm", "projector grad cosine"):
        row = re.search(rf"^  {re.escape(quantity)}\s+sdpa\s+{NUMBER}\s+eager\s+{NUMBER}\s+\|diff\| {NUMBER}"
                        r"\s+\S.*\sok$", stage, re.M)
        assert row, f"no comparison row for {quantity!r} in:\n{stage}"
        sdpa, eager, _ = (float(x) for x in row.groups())
        assert eager == pytest.approx(sdpa, rel=1e-3, abs=1e-5)
    assert float(re.search(rf"projector grad norm\s+sdpa\s+{NUMBER}", stage).group(1)) > 0
    assert "  eager = sdpa: yes" in stage


def _assert_lora_trained(lora: str) -> None:
    assert re.search(r"trains projector \+ adapters: \S+ M of \S+ M parameters \(\d+ tensors\); adapters in "
                     r"float32;", lora), lora
    losses = [float(x) for x in re.findall(rf"^  step \d: loss {NUMBER} \(lm", lora, re.M)]
    assert len(losses) == 2 and losses[0] != losses[1], lora
    assert "losses finite: yes; the steps changed the loss: yes" in lora


def _wheelhouse(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_wheelhouse.sh"), *args], cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=60)


def test_wheelhouse_dry_run_targets_the_boxs_python_and_platform_and_leaves_torch_out(tmp_path):
    done = _wheelhouse("--dry-run", "--python-version", "3.12", "--platform", "manylinux_2_28_aarch64",
                       "--out", str(tmp_path / "wh"), "--without", "numpy")
    assert done.returncode == 0, done.stderr
    build, resolve, download = done.stdout.splitlines()
    assert build.endswith(f"pip wheel --quiet --no-deps -w {tmp_path / 'wh'} deepspeed==0.19.8")  # sdist on PyPI
    for command in (resolve, download):
        assert "--only-binary=:all: --python-version 3.12" in command
        # the glibc 2.28 tag and every older one the box also runs, with their legacy names
        platforms = re.findall(r"--platform=(\S+)", command)
        assert platforms[0] == "manylinux_2_28_aarch64" and "manylinux_2_17_aarch64" in platforms
        assert {"manylinux2014_aarch64", "manylinux1_aarch64"} <= set(platforms)
    assert "-r " + str(REPO / "requirements" / "gpu-check.txt") in resolve
    assert "-c " + str(REPO / "requirements" / "main.txt") in resolve  # main.txt's versions
    assert f"-d {tmp_path / 'wh'}" in download and "less torch's own and numpy" in download
    assert not (tmp_path / "wh").exists()  # nothing downloaded, nothing built


@pytest.mark.parametrize("args, message", [
    (["--python-version", "3"], "--python-version '3' is not X.Y"),
    (["--platform", "linux x86"], "--platform 'linux x86' is not a wheel platform tag"),
    (["--out"], "--out needs a value"),
    (["--without", "--dry-run"], "--without needs a value"),
    (["--gpu"], "unknown argument '--gpu' (--help lists the options)"),
])
def test_wheelhouse_refuses_bad_arguments_in_one_line(args, message):
    done = _wheelhouse("--dry-run", *args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"gpu_wheelhouse: {message}") and done.stderr.count("\n") == 1


def test_wheelhouse_help_lists_every_option():
    done = _wheelhouse("--help")
    assert done.returncode == 0
    for option in ("--python-version", "--platform", "--out", "--without", "--dry-run", "PYTHON"):
        assert option in done.stdout


def _make_dry_run(tmp_path, *variables: str) -> str:
    done = subprocess.run(["make", "-n", "env", f"ENV_ROOT={tmp_path}", *variables], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cuda_environment_is_pypis_cuda_torch_and_the_requirements_without_a_flash_attn_build(tmp_path):
    plain = _make_dry_run(tmp_path, "HAS_CUDA=1")
    # `===`: the release itself, never a local CPU build of that version (2.13.0+cpu) that == would take
    assert re.search(r"pip install -q\s+torch===2\.13\.0 torchvision===0\.28\.0$", plain, re.M), plain
    assert "flash-attn" not in plain and "gpu.txt" not in plain
    source = _make_dry_run(tmp_path, "HAS_CUDA=1", "FLASH_ATTN=1")
    assert "pip install --no-build-isolation -r requirements/gpu.txt" in source
    wheel = _make_dry_run(tmp_path, "HAS_CUDA=1", "FLASH_ATTN_WHEEL=/wheels/flash_attn-2.8.3-cp311-linux_x86_64.whl")
    assert "pip install --no-deps /wheels/flash_attn-2.8.3-cp311-linux_x86_64.whl" in wheel
    indexed = _make_dry_run(tmp_path, "HAS_CUDA=1", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128")
    assert "--index-url https://download.pytorch.org/whl/cu128 torch==2.13.0 torchvision==0.28.0" in indexed
    # each choice is an environment of its own (the hash in its folder name)
    folders = {re.search(rf"ln -sfn ({re.escape(str(tmp_path))}/main-\w+) .venv", out).group(1)
               for out in (plain, source, wheel, indexed, _make_dry_run(tmp_path, "HAS_CUDA=0"))}
    assert len(folders) == 5


@pytest.mark.parametrize("variables, message", [
    (["HAS_CUDA=0", "FLASH_ATTN=1"], "flash-attn (FLASH_ATTN=1 or FLASH_ATTN_WHEEL) belongs to the CUDA environment"),
    (["HAS_CUDA=1", "FLASH_ATTN=1", "FLASH_ATTN_WHEEL=x.whl"], "give either FLASH_ATTN=1 (build from source) or"),
])
def test_make_env_refuses_a_flash_attn_choice_that_cannot_hold(tmp_path, variables, message):
    done = subprocess.run(["make", "-n", "env", f"ENV_ROOT={tmp_path}", *variables], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and message in done.stderr


def test_import_check_walks_every_module_of_the_product_but_the_commands():
    from bench.import_check import product_modules

    on_disk = {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
               for package in ("pipeline", "stages") for path in (REPO / package).rglob("*.py")}
    assert set(product_modules()) == {name for name in on_disk if not name.endswith(".__main__")}
    assert "pipeline.tinyworld.__main__" in on_disk  # `python -m pipeline.tinyworld` generates a world on import


def test_import_check_names_each_module_that_does_not_import_and_why():
    from bench.import_check import import_all

    failed = import_all(["pipeline.atomic", "pipeline.no_such_module"])
    assert failed == {"pipeline.no_such_module": "ModuleNotFoundError: No module named 'pipeline.no_such_module'"}
