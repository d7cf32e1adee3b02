"""pipeline/train/checkpoint.py: complete-or-invisible ZeRO-3 checkpoints and exact resume.

The fast tests cover the on-disk protocol (markers, `latest`, retention, config). The slow ones
read the shared launches of tests/ds_toy.py: real DeepSpeed ZeRO-3 on 2 CPU ranks over gloo, an
uninterrupted reference run and the same run crashed mid-save, resumed, preempted, resumed again.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.train.checkpoint import (
    COMPLETE, CheckpointConfig, CheckpointError, Checkpointer, export_full_state_dict,
    latest_complete_step, read_marker, retained_steps, saved_steps, trained_weights,
)
from pipeline.train.rng import capture_rng_state, restore_rng_state
from tests.ds_toy import N_SAMPLES


def make_checkpoint(ckpt_dir: Path, step: int, complete: bool = True, world_size: int = 2) -> Path:
    """A checkpoint folder as far as the protocol sees it (no DeepSpeed shards)."""
    step_dir = ckpt_dir / f"global_step{step}"
    step_dir.mkdir(parents=True)
    if complete:
        (step_dir / COMPLETE).write_text(json.dumps({"step": step, "world_size": world_size}))
    return step_dir


# ---------------------------------------------------------------- protocol (fast)


def test_retention_keeps_the_last_n_and_every_multiple_of_m():
    assert retained_steps([2, 4, 6, 8, 10], newest=10, keep_last=2, keep_every=4) == {4, 8, 10}
    assert retained_steps([2, 4, 6, 8, 10], newest=10, keep_last=2, keep_every=0) == {8, 10}
    assert retained_steps([2], newest=2, keep_last=3, keep_every=0) == {2}


def test_retention_leaves_checkpoints_above_the_new_step_alone():
    # after a forced resume_step=4 the old run's 6..10 stay until the new run overwrites them
    assert retained_steps([2, 4, 6, 8, 10], newest=4, keep_last=1, keep_every=0) == {4, 6, 8, 10}


def test_latest_complete_step_never_returns_a_folder_without_marker(tmp_path):
    assert latest_complete_step(tmp_path / "missing") is None
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4, complete=False)
    assert latest_complete_step(tmp_path) == 2
    (tmp_path / "latest").write_text("global_step4")
    assert latest_complete_step(tmp_path) == 2
    assert saved_steps(tmp_path) == [2] and saved_steps(tmp_path, complete=False) == [4]


def test_latest_complete_step_follows_latest_over_newer_folders(tmp_path):
    for step in (2, 6):
        make_checkpoint(tmp_path, step)
    (tmp_path / "latest").write_text("global_step2")  # a forced resume from 2 started a new timeline
    assert latest_complete_step(tmp_path) == 2


def test_unreadable_marker_names_the_file_and_the_fix(tmp_path):
    step_dir = make_checkpoint(tmp_path, 3, complete=False)
    (step_dir / COMPLETE).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"global_step3/COMPLETE.*delete"):
        read_marker(step_dir)


def test_config_rejects_values_that_cannot_work():
    with pytest.raises(ConfigError, match="keep_last"):
        load_config(CheckpointConfig, overrides=["keep_last=0"])
    with pytest.raises(ConfigError, match="resume_step"):
        load_config(CheckpointConfig, overrides=["resume=never", "resume_step=4"])
    with pytest.raises(ConfigError, match="resume"):
        load_config(CheckpointConfig, overrides=["resume=sometimes"])
    assert load_config(CheckpointConfig, overrides=["resume_step=4"]).resume_step == 4


def test_fresh_start_is_refused_in_a_folder_with_checkpoints(tmp_path):
    make_checkpoint(tmp_path, 2)
    with pytest.raises(CheckpointError, match=r"resume is 'never'.*steps \[2\]"):
        Checkpointer(tmp_path, CheckpointConfig(resume="never"), engine=None).load()


def test_resume_step_without_complete_checkpoint_is_refused(tmp_path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4, complete=False)
    with pytest.raises(CheckpointError, match=r"resume_step=4.*complete steps: \[2\]"):
        Checkpointer(tmp_path, CheckpointConfig(resume_step=4), engine=None).load()


def test_empty_folder_starts_fresh(tmp_path):
    assert Checkpointer(tmp_path / "checkpoints", CheckpointConfig(), engine=None).load() is None


def test_export_refuses_an_incomplete_checkpoint(tmp_path):
    make_checkpoint(tmp_path, 3, complete=False)
    for consolidate in (export_full_state_dict, trained_weights):
        with pytest.raises(CheckpointError, match="global_step3: not a complete checkpoint"):
            consolidate(tmp_path, 3)


def test_frozen_parameters_are_left_out_of_the_checkpoint_whenever_the_model_has_any(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    assert not Checkpointer(tmp_path, CheckpointConfig(), SimpleNamespace(module=model)).trainable_only
    model[0].requires_grad_(False)  # a frozen tower
    assert Checkpointer(tmp_path, CheckpointConfig(), SimpleNamespace(module=model)).trainable_only
    forced = Checkpointer(tmp_path, CheckpointConfig(), SimpleNamespace(module=model), trainable_only=False)
    assert not forced.trainable_only


def draws() -> tuple:
    dropout_mask = torch.nn.functional.dropout(torch.ones(8), 0.5)
    return random.random(), float(np.random.normal()), torch.rand(3).tolist(), dropout_mask.tolist()


def test_restored_rng_state_replays_python_numpy_and_torch_draws(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    draws()
    torch.save(capture_rng_state(), tmp_path / "rng.pt")  # the way it travels: inside rank_<r>.pt
    expected = draws()
    draws()
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=False))
    assert draws() == expected


def test_rng_state_from_elsewhere_is_refused_by_missing_generator():
    with pytest.raises(ValueError, match="lacks numpy"):
        restore_rng_state({"python": random.getstate(), "torch": torch.get_rng_state()})


# ---------------------------------------------------------------- real ZeRO-3, 2 CPU ranks (slow)


@pytest.mark.slow
def test_resume_after_crash_and_preemption_replays_bit_identical_losses(toy):
    toy.assert_succeeded("reference", "preempted", "finished")
    for rank in (0, 1):
        reference = toy.steps(toy.reference, "reference", rank)
        assert sorted(reference) == list(range(1, 11))
        crash = toy.steps(toy.resumed, "crash", rank)
        preempted = toy.steps(toy.resumed, "preempted", rank)
        finished = toy.steps(toy.resumed, "finished", rank)
        assert sorted(preempted) == [5, 6, 7] and sorted(finished) == [8, 9, 10]
        for run in (crash, preempted, finished):
            for step, entry in run.items():
                # hex floats: equal strings mean bit-identical loss and learning rate
                assert (entry["loss"], entry["lr"], entry["samples"]) == (
                    reference[step]["loss"], reference[step]["lr"], reference[step]["samples"]), (rank, step)


@pytest.mark.slow
def test_resumed_run_consumes_every_sample_once_per_epoch(toy):
    consumed = []  # what the resumed run trained on, in order: crash 1-4, preempted 5-7, finished 8-10
    for rank in (0, 1):
        runs = [toy.steps(toy.resumed, "crash", rank), toy.steps(toy.resumed, "preempted", rank),
                toy.steps(toy.resumed, "finished", rank)]
        timeline = {**{s: e for s, e in runs[0].items() if s <= 4}, **runs[1], **runs[2]}
        assert sorted(timeline) == list(range(1, 11))
        consumed.append([key for step in sorted(timeline) for key in timeline[step]["samples"]])
    first_epoch = [key for per_rank in consumed for key in per_rank[: N_SAMPLES // 2]]
    assert sorted(first_epoch) == list(range(N_SAMPLES))


@pytest.mark.slow
def test_checkpoint_cut_short_by_a_dead_rank_is_skipped_for_the_previous_one(toy):
    assert toy.launches["crash"].returncode != 0, toy.launches["crash"].output[-4000:]
    assert "global_step6/COMPLETE" not in toy.files_after_crash
    assert "skipping" in toy.launches["preempted"].output
    assert "global_step6: no COMPLETE marker" in toy.launches["preempted"].output
    for rank in (0, 1):
        assert [e["step"] for e in toy.events(toy.resumed, "preempted", rank, "resumed")] == [4]


@pytest.mark.slow
def test_latest_moves_only_after_every_rank_wrote_its_part(toy):
    # rank 1 died after DeepSpeed's shards and rank 0's part of step 6 were on disk
    assert {"global_step6/rank_0.pt", "global_step6/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "global_step6/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(toy.files_after_crash)
    assert "global_step6/rank_1.pt" not in toy.files_after_crash
    assert toy.latest_after_crash == "global_step4"


@pytest.mark.slow
def test_retention_keeps_the_last_two_and_every_fourth_step(toy):
    toy.assert_succeeded("reference")
    assert saved_steps(toy.reference / "checkpoints") == [4, 8, 10]
    # the crashed, preempted and resumed timeline ends with the same set, nothing incomplete left
    assert saved_steps(toy.resumed / "checkpoints") == [4, 8, 10]
    assert saved_steps(toy.resumed / "checkpoints", complete=False) == []
    assert (toy.resumed / "checkpoints" / "latest").read_text() == "global_step10"
    assert read_marker(toy.resumed / "checkpoints" / "global_step10")["world_size"] == 2


@pytest.mark.slow
def test_world_size_mismatch_is_refused_with_the_conversion_command(toy):
    [refused] = toy.events(toy.resumed, "one_rank", 0, "refused")
    source = toy.resumed / "checkpoints" / "global_step10"
    assert "was written by 2 ranks, this run has 1" in refused["message"]
    assert (f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {source} "
            f"--output_folder {source}_universal") in refused["message"]
    assert '"checkpoint": {"load_universal": true}' in refused["message"]


@pytest.mark.slow
def test_universal_checkpoint_resumes_on_a_different_world_size(toy):
    toy.assert_succeeded("conversion", "one_rank")
    [resumed] = toy.events(toy.resumed, "one_rank", 0, "resumed")
    assert resumed == {"event": "resumed", "step": 10, "restored_extra": False}
    loaded = torch.load(toy.resumed / "weights_one_rank_loaded.pt")
    reference = torch.load(toy.reference / "weights_reference_final.pt")
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[name], reference[name]) for name in reference)
    assert sorted(toy.steps(toy.resumed, "one_rank", 0)) == [11]


@pytest.mark.slow
def test_export_full_state_dict_equals_the_gathered_weights(toy):
    toy.assert_succeeded("reference")
    exported = export_full_state_dict(toy.reference / "checkpoints", 10)
    gathered = torch.load(toy.reference / "weights_reference_final.pt")
    assert exported.keys() == gathered.keys()
    for name, tensor in gathered.items():
        assert exported[name].dtype == torch.float32 and torch.equal(exported[name], tensor), name
