"""Stage 1 end to end: DeepSpeed ZeRO-3 on 2 CPU ranks with the decoder checkpointed equals 1 rank
without; one MLflow run on a real server; a text-only rank beside an image rank never hangs, and the
CPU-offload DeepSpeed config trains."""
from __future__ import annotations

import json
import re

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.conftest import write_training_shards
from tests.stage_runner import alongside, consumed_keys, metrics_by_step, run_stage, stage_overrides, start_stage

pytestmark = pytest.mark.slow
CONFIG = "configs/tiny/stage1.yaml"
BATCH = 4


@pytest.fixture(scope="module")
def parity_shards(tiny_world, tmp_path_factory):
    # One micro-batch per shard: 2 ranks read shards (2k, 2k+1) at step k, exactly what 1 rank
    # with 2 accumulation micro-steps reads, so both see the same samples per optimizer step.
    return write_training_shards(tiny_world, tmp_path_factory.mktemp("parity"), samples=12 * BATCH,
                                 per_shard=BATCH)


def test_two_rank_zero3_with_checkpointing_matches_one_rank_without_and_logs_one_mlflow_run(
        tiny_world, parity_shards, tmp_path, request):
    common = {"loader.batch_size": BATCH, "loader.shuffle_shards": "false", "tracking.plot_every_steps": 3}
    one, one_log = tmp_path / "one_rank", tmp_path / "one.log"
    one_rank = start_stage("stages.stage1_align", CONFIG,
                           stage_overrides(tiny_world, parity_shards, one, **common, **{"optim.grad_accum": 2}),
                           ranks=1, log=one_log)
    with alongside(one_rank, one_log):  # the two runs side by side
        server = request.getfixturevalue("tracking_server")  # the session's; if new, it starts beside the run
        two = tmp_path / "two_ranks"
        run_stage("stages.stage1_align", CONFIG,
                  stage_overrides(tiny_world, parity_shards, two, **common,
                                  **{"tracking.tracking_uri": server.uri, "tracking.experiment": "parity",
                                     # frozen decoder recomputed under ZeRO-3: same losses, same projector
                                     "model.gradient_checkpointing": "true"}),
                  ranks=2, launch_script="stage1.sh", log=tmp_path / "two.log")
        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("parity")
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 1, "only global rank 0 may open a run"
        run = runs[0]
        assert run.info.run_name == "stage1-two_ranks"
        assert run.data.params["optim.lr"] == "0.001" and run.data.params["stage"] == "stage1"
        assert run.data.tags["world_size"] == "2" and run.data.tags["stage"] == "stage1"
        history = client.get_metric_history(run.info.run_id, "align")
        assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
        assert {m.key for m in client.get_metric_history(run.info.run_id, "cos_layer/3")}
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "deepspeed.json", "plots", "export"} <= names
        plots = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
        assert plots and all(p.endswith(".png") for p in plots)

    loads = re.findall(r"rank \d: model ([\d.]+)M parameters .* ([\d.]+)M materialised", (tmp_path / "two.log").read_text())
    assert len(loads) == 2 and all(float(local) < 0.6 * float(total) for total, local in loads), \
        f"ZeRO-3 must load the towers partitioned, not whole on each rank: {loads}"

    a, b = metrics_by_step(one), metrics_by_step(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        for part in ("lm", "align", "pair", "cos_layer/2", "grad_norm", "lr"):
            # Same samples, same math (the recompute too); only the reduction order differs (fp32 on CPU).
            assert a[step][part] == pytest.approx(b[step][part], rel=1e-4, abs=1e-5), (step, part)
    projector_one = load_file(one / "export" / "projector.safetensors")
    projector_two = load_file(two / "export" / "projector.safetensors")
    for name, weight in projector_one.items():
        assert weight.allclose(projector_two[name], atol=1e-5), name


def test_a_text_only_rank_beside_an_image_rank_does_not_hang_the_frozen_llm_and_cpu_offload_trains(
        tiny_world, tmp_path):
    """The stage-1 twin of stage 2's mixed-batch test: rank 0 reads only text-only chats, rank 1 only
    image samples (shards go to ranks round robin); with the LLM frozen and no checkpointing the
    text-only rank must still run the backward all-gathers the image rank waits on. The run uses
    configs/deepspeed/zero3_offload.json: DeepSpeed's CPU Adam steps the offloaded partitions."""
    text_only = [r for r in json.loads(tiny_world.stage2_json.read_text()) if "image" not in r][:4]
    images = json.loads(tiny_world.stage1_json.read_text())[:4]
    shards = write_training_shards(tiny_world, tmp_path / "shards", samples=8, per_shard=4, records=text_only + images)
    run = tmp_path / "run"
    run_stage("stages.stage1_align", CONFIG,
              stage_overrides(tiny_world, shards, run, **{
                  "loader.batch_size": 2, "max_steps": 2, "loader.shuffle_shards": "false",
                  "tracking.enabled": "false", "deepspeed_config": "configs/deepspeed/zero3_offload.json"}),
              ranks=2, launch_script="stage1.sh", log=tmp_path / "stage1.log", timeout=300)
    metrics = metrics_by_step(run)
    assert sorted(metrics) == [1, 2] and all(row["grad_norm"] > 0 for row in metrics.values())
    zero = json.loads((run / "deepspeed.json").read_text())["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and isinstance(zero["reduce_bucket_size"], int)
    first_image_key = f"stage1_{len(text_only):06d}"
    assert all(k < first_image_key for keys in consumed_keys(run, 0).values() for k in keys)
    assert all(k >= first_image_key for keys in consumed_keys(run, 1).values() for k in keys)
    assert (run / "export" / "projector.safetensors").is_file()
