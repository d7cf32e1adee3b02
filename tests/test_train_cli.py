"""The training stages' entry (pipeline/train/cli.py): --help, --print-config and --dry-run answer
in seconds, before any process group, model load or queue wait."""
from __future__ import annotations

import sys

import pytest
import yaml

from pipeline.train.cli import run_training_stage
from tests.conftest import write_training_shards
from tests.stage_runner import stage_overrides


@pytest.fixture
def world_of_one(monkeypatch):
    """What the stage entry's rank environment would be; restored after the test."""
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def shards(tiny_world, tmp_path_factory):
    return write_training_shards(tiny_world, tmp_path_factory.mktemp("cli") / "shards", samples=24,
                                 per_shard=12)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        run_training_stage("stage1", argv)
    out = capsys.readouterr()
    code = exit_.value.code
    return (code if isinstance(code, int) else 1), out.out, out.err + (code if isinstance(code, str) else "")


def test_help_lists_every_key_with_its_type_and_default(world_of_one, capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "--dry-run [--world-size N]" in out
    for line in ("  loader.batch_size: int = 4", "  stage: one of 'stage1', 'stage2' (required)",
                 "  lora: (optional section: omit for none)", "  lora.rank: int = 128",
                 "  tracking.print_every_steps: int = 10"):
        assert line in out.splitlines(), line


def test_print_config_prints_the_resolved_yaml_with_the_overrides(world_of_one, tiny_world, shards, tmp_path, capsys):
    argv = ["--config", "configs/tiny/stage1.yaml", *stage_overrides(tiny_world, shards, tmp_path / "run"),
            "optim.lr=0.002", "--print-config"]
    code, out, _ = run(argv, capsys)
    resolved = yaml.safe_load(out)
    assert code == 0 and resolved["optim"]["lr"] == 0.002 and resolved["shards"] == str(shards)
    assert not (tmp_path / "run").exists(), "print-config must not start the run"


def test_dry_run_passes_a_runnable_config_and_prints_its_step_count(world_of_one, tiny_world, shards, tmp_path, capsys):
    argv = ["--config", "configs/tiny/stage1.yaml", *stage_overrides(tiny_world, shards, tmp_path / "run"),
            "--dry-run", "--world-size", "2"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "[dry-run] stage1: 3 optimizer steps on 2 rank(s)" in out  # 24 samples / (2 ranks x batch 4)
    assert not (tmp_path / "run").exists()


def test_dry_run_names_an_empty_model_folder_a_projector_folder_and_too_few_shards(
        world_of_one, tiny_world, shards, tmp_path, capsys):
    empty = tmp_path / "llm"
    empty.mkdir()
    argv = ["--config", "configs/tiny/stage1.yaml", *stage_overrides(tiny_world, shards, tmp_path / "run"),
            f"model.llm={empty}", f"model.projector={tmp_path}", "--dry-run", "--world-size", "4"]
    code, _, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith("[dry-run]")]
    assert code == 1 and "Traceback" not in err
    assert any(f"model.llm={empty}: not a model folder" in line for line in lines), err
    assert any(f"model.projector={tmp_path}: not a file" in line for line in lines), err
    assert any("2 shard(s) for 4 ranks" in line for line in lines), err


def test_a_real_start_with_an_empty_model_folder_stops_with_one_line_before_deepspeed(
        world_of_one, tiny_world, shards, tmp_path, capsys):
    empty = tmp_path / "llm"
    empty.mkdir()
    argv = ["--config", "configs/tiny/stage1.yaml", *stage_overrides(tiny_world, shards, tmp_path / "run"),
            f"model.llm={empty}"]
    code, _, err = run(argv, capsys)
    problems = [line for line in err.splitlines() if line.startswith("[stage1] ")]
    assert code == 1 and "Traceback" not in err and not (tmp_path / "run").exists()
    assert problems and problems[0].startswith(f"[stage1] model.llm={empty}: not a model folder"), err


def fake_checkpoint(run_dir, step: int, world: int) -> None:
    """The files a resume reads first: a complete step folder with its marker, and `latest`."""
    import json

    step_dir = run_dir / "checkpoints" / f"global_step{step}"
    step_dir.mkdir(parents=True)
    (step_dir / "COMPLETE").write_text(json.dumps({"step": step, "world_size": world, "tag": step_dir.name}))
    (run_dir / "checkpoints" / "latest").write_text(step_dir.name)


@pytest.mark.parametrize("saved_step,extra,expected", [
    (3, [], "this run finished (step 3 of 3, on 2 ranks); nothing to resume"),  # 2-rank run, rerun with 1
    # the README's promise: the command that converts it for another world size
    (2, [], "global_step2 was written by 2 ranks, this run has 1. ZeRO-3 shards are split per rank and "
            "cannot be loaded by a different number of ranks. Either resume with 2 ranks, or convert it to a "
            f"DeepSpeed universal checkpoint:\n    {sys.executable} -m deepspeed.checkpoint.ds_to_universal"),
    (2, ["checkpoint.resume_step=1"], "checkpoint.resume_step=1: "),
    (2, ["checkpoint.resume=never"], "checkpoint.resume is 'never' but "),
])
def test_what_a_resume_would_find_is_checked_before_the_start(world_of_one, tiny_world, shards, tmp_path, capsys,
                                                               saved_step, extra, expected):
    run_dir = tmp_path / "run"
    fake_checkpoint(run_dir, saved_step, world=2)
    argv = ["--config", "configs/tiny/stage1.yaml", *stage_overrides(tiny_world, shards, run_dir), "max_steps=3",
            *extra]
    code, _, err = run(argv, capsys)
    problems = [line for line in err.splitlines() if line.startswith("[stage1] ")]
    assert code == 1 and "Traceback" not in err and len(problems) == 1, err
    assert expected in err[err.index(problems[0]):]
