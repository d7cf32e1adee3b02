"""Stage 2 end to end on 2 ZeRO-3 CPU ranks: projector + LLM train on mixed image / text-only batches,
packed and length-grouped (configs/tiny/stage2.yaml); a killed run resumes bit-identically; ranks with
text-only and image batches at the same step never wait on each other, the decoder checkpointed."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from pipeline.train.checkpoint import saved_steps
from tests.conftest import write_training_shards
from tests.stage_runner import consumed_keys, metrics_by_step, run_stage, stage_overrides
from tests.test_resume import reference_beside_a_killed_run, steps_done

pytestmark = pytest.mark.slow


RESUME_STEPS = 10


def test_stage2_trains_mixed_batches_and_a_killed_run_resumes_with_identical_losses_and_samples(
        tiny_world, tmp_path):
    """The uninterrupted reference run (beside the interrupted one) is also the check that stage 2
    trains projector and LLM on batches that mix image and text-only samples."""
    shards = write_training_shards(tiny_world, tmp_path / "shards", samples=96, per_shard=12, stage="stage2")
    manifest = pq.read_table(shards / "manifest.parquet").to_pylist()
    text_only = {row["key"] for row in manifest if not row["has_image"]}
    assert text_only, "the tiny stage-2 data has text-only samples"

    def overrides(run):
        return stage_overrides(tiny_world, shards, run, **{
            "loader.batch_size": 2, "max_steps": RESUME_STEPS, "model.projector": "null",
            "checkpoint.every_steps": 4, "tracking.plot_every_steps": 0})

    reference, run = tmp_path / "reference", tmp_path / "run"
    reference_log = tmp_path / "reference.log"
    reference_beside_a_killed_run(  # killed mid length-group, mid epoch, with no chance to save
        "stages.stage2_instruct", "configs/tiny/stage2.yaml", overrides, reference, run,
        lambda run: 4 in saved_steps(run / "checkpoints") and steps_done(run) >= 6, launch_script="stage2.sh")

    metrics = metrics_by_step(reference)
    assert sorted(metrics) == list(range(1, RESUME_STEPS + 1))
    for step, row in metrics.items():
        assert row["grad_norm"] > 0 and row["n_valid"] > 0, step
        assert row["tokens_per_second"] > 0 and row["model_tflops_per_second"] > 0, step
        assert "mfu" not in row, "no MFU without a known device peak"
    seen = {k for rank in (0, 1) for keys in consumed_keys(reference, rank).values() for k in keys}
    assert seen & text_only, "text-only samples were trained alongside image samples"
    reference_text = reference_log.read_text()
    assert "trainable" in reference_text
    # packed rows, no dropout: the captions ride in the row (one forward per micro-step)
    assert "TGA caption targets: from the packed rows" in reference_text
    # the progress line a Slurm .out file shows between checkpoints (tracking.print_every_steps: 10)
    assert f"[stage2] step {RESUME_STEPS}/{RESUME_STEPS} lm " in reference_text and " ETA " in reference_text

    expected, got = metrics_by_step(reference), metrics_by_step(run)
    assert sorted(got) == list(range(1, RESUME_STEPS + 1))
    for step in expected:
        for part in ("lm", "align", "pair", "grad_norm", "lr"):
            assert got[step][part] == expected[step][part], (step, part)  # bit-identical on CPU
    for rank in (0, 1):
        assert consumed_keys(run, rank) == consumed_keys(reference, rank), f"rank {rank} sample order"


def test_a_text_only_batch_on_one_rank_and_images_on_the_other_do_not_hang_zero3(tiny_world, tracking_server,
                                                                                 tmp_path):
    """Rank 0 reads only text-only chats, rank 1 only image samples (shards go to ranks round robin):
    every step the ranks run different batches through the same modules in the same order. The
    decoder layers are checkpointed, as configs/stage2.yaml has them (their recompute gathers again)."""
    records = json.loads(tiny_world.stage2_json.read_text())
    text_only = [r for r in records if "image" not in r][:8]
    images = [r for r in records if "image" in r][:8]
    shards = write_training_shards(tiny_world, tmp_path / "shards", samples=16, per_shard=8, stage="stage2",
                                   records=text_only + images)
    run = tmp_path / "run"
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    # the run also shows on a real tracking server (the session's, in an experiment of this test's)
    run_stage("stages.stage2_instruct", "configs/tiny/stage2.yaml",
              stage_overrides(tiny_world, shards, run, **{
                  "loader.batch_size": 2, "max_steps": 3, "model.projector": "null",
                  "loader.shuffle_shards": "false", "tracking.plot_every_steps": 0,
                  "tracking.tracking_uri": tracking_server.uri, "tracking.experiment": "stage2",
                  "model.gradient_checkpointing": "true"}),
              ranks=2, launch_script="stage2.sh", log=tmp_path / "stage2.log", timeout=300)
    client = MlflowClient(tracking_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("stage2").experiment_id])
    assert [r.info.run_name for r in runs] == ["stage2-run"]
    assert runs[0].data.params["trainable"] == "['projector', 'llm']" and runs[0].data.tags["stage"] == "stage2"
    for metric in ("lm", "tokens_per_second", "model_tflops_per_second"):
        assert [m.step for m in client.get_metric_history(runs[0].info.run_id, metric)] == [1, 2, 3], metric
    assert sorted(metrics_by_step(run)) == [1, 2, 3]
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shm_before, "shm buffers leaked"
    assert all(k.startswith("stage2_00000") for keys in consumed_keys(run, 0).values() for k in keys)
    first_image_key = f"stage2_{len(text_only):06d}"
    assert all(k >= first_image_key for keys in consumed_keys(run, 1).values() for k in keys)
