"""The bf16 lane: what GPUs run (bf16 weights, a bf16 DeepSpeed engine with fp32 master weights),
run on DeepSpeed's CPU accelerator, so that a dtype defect shows here before anyone rents a GPU.
Stage 1 → its projector → stage 2 with the captions in the packed rows → the bf16 export loaded by
plain transformers, and stage 2 with LoRA (whose adapters peft would otherwise upcast to fp32, which
ZeRO-3 refuses at deepspeed.initialize). Two optimizer steps each, on 2 ZeRO-3 ranks."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoProcessor, LlavaForConditionalGeneration

from pipeline.export import main as export_main
from pipeline.train.checkpoint import export_full_state_dict
from tests.conftest import write_training_shards
from tests.stage_runner import alongside, metrics_by_step, run_stage, stage_overrides, start_stage

pytestmark = pytest.mark.slow

BF16 = {"model.dtype": "bf16", "max_steps": 2, "loader.batch_size": 4, "checkpoint.every_steps": 2,
        "tracking.plot_every_steps": 0}


@pytest.fixture(scope="module")
def stage2_shards(tiny_world, tmp_path_factory):
    return write_training_shards(tiny_world, tmp_path_factory.mktemp("bf16") / "shards", samples=32, per_shard=8,
                                 stage="stage2")


def trained_in_bf16(run) -> dict[int, dict]:
    engine_config = json.loads((run / "deepspeed.json").read_text())
    assert engine_config["bf16"]["enabled"] is True, "model.dtype=bf16 must give a bf16 engine"
    metrics = metrics_by_step(run)
    assert sorted(metrics) == [1, 2]
    for step, row in metrics.items():
        assert all(torch.isfinite(torch.tensor(row[k])) for k in ("lm", "align", "pair")), (step, row)
        assert row["grad_norm"] > 0
    return metrics


def test_stage1_stage2_in_the_row_lora_and_the_export_run_in_bf16_on_two_zero3_ranks(
        tiny_world, stage1_shards, stage2_shards, tmp_path):
    stage1, lora = tmp_path / "stage1", tmp_path / "lora"
    lora_overrides = stage_overrides(tiny_world, stage2_shards, lora, **BF16, **{
        "model.projector": "null", "trainable": "[projector]", "lora.rank": 4, "lora.alpha": 8,
        "lora.dropout": 0.0})
    lora_log = lora.with_suffix(".log")
    with alongside(start_stage("stages.stage2_instruct", "configs/tiny/stage2.yaml", lora_overrides, ranks=2,
                               launch_script="stage2.sh", log=lora_log), lora_log):
        run_stage("stages.stage1_align", "configs/tiny/stage1.yaml",
                  stage_overrides(tiny_world, stage1_shards, stage1, **BF16, **{"distributed.timeout_minutes": 45}),
                  ranks=2, launch_script="stage1.sh", log=stage1.with_suffix(".log"))
    trained_in_bf16(stage1)
    # read back from the process group's backend: the setting reached torch.distributed
    assert "over gloo, collective timeout 45 min" in stage1.with_suffix(".log").read_text()
    assert "collective timeout 60 min" in lora_log.read_text()  # the default
    projector = stage1 / "export" / "projector.safetensors"
    with safe_open(str(projector), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}

    trained_in_bf16(lora)
    saved = export_full_state_dict(lora / "checkpoints", 2)
    adapters = {name: t for name, t in saved.items() if ".lora_A." in name or ".lora_B." in name}
    assert adapters, "the LoRA run must checkpoint its adapters"

    stage2 = tmp_path / "stage2"
    run_stage("stages.stage2_instruct", "configs/tiny/stage2.yaml",
              stage_overrides(tiny_world, stage2_shards, stage2, **BF16, **{
                  "model.projector": projector, "loader.packing": "true", "caption_forward": "in_row"}),
              ranks=2, launch_script="stage2.sh", log=stage2.with_suffix(".log"))
    trained_in_bf16(stage2)
    assert "TGA caption targets: from the packed rows" in stage2.with_suffix(".log").read_text()

    export = tmp_path / "export"
    export_main(["--checkpoint", str(stage2 / "checkpoints"), "--out", str(export)])
    model = LlavaForConditionalGeneration.from_pretrained(export)
    assert model.dtype == torch.bfloat16
    processor = AutoProcessor.from_pretrained(export)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
                                           add_generation_prompt=True)
    inputs = processor(text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
