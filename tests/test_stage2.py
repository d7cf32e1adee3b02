"""Stage 2 end to end on 2 ZeRO-3 CPU ranks: projector + LLM train on mixed image / text-only batches."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from tests.conftest import write_training_shards
from tests.stage_runner import consumed_keys, metrics_by_step, run_stage, stage_overrides

pytestmark = pytest.mark.slow


def test_stage2_trains_llm_and_projector_with_text_only_samples_in_the_batches(tiny_world, tmp_path):
    shards = write_training_shards(tiny_world, tmp_path / "shards", samples=64, per_shard=8, stage="stage2")
    manifest = pq.read_table(shards / "manifest.parquet").to_pylist()
    text_only = {row["key"] for row in manifest if not row["has_image"]}
    assert text_only, "the tiny stage-2 data has text-only samples"
    run = tmp_path / "run"
    run_stage("stages.stage2_instruct", "configs/tiny/stage2.yaml",
              stage_overrides(tiny_world, shards, run, **{"loader.batch_size": 4, "model.projector": "null",
                                                          "tracking.plot_every_steps": 0}),
              ranks=2, launch_script="stage2.sh", log=tmp_path / "stage2.log")
    metrics = metrics_by_step(run)
    steps = sorted(metrics)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 6
    assert all(metrics[s]["grad_norm"] > 0 and metrics[s]["n_valid"] > 0 for s in steps)
    seen = {k for rank in (0, 1) for keys in consumed_keys(run, rank).values() for k in keys}
    assert seen & text_only, "text-only samples were trained alongside image samples"
    log = (tmp_path / "stage2.log").read_text()
    assert "trainable" in log and "stage2" in log
