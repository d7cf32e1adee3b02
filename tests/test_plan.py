"""pipeline/train/plan.py: the run's size and caption plan, and the one answer to what trains."""
from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.data.loader import batches_per_epoch
from pipeline.model.assemble import apply_freeze, llava_config, meta_llava
from pipeline.model.lora import add_lora
from pipeline.train import plan
from pipeline.train.config import TrainConfig
from pipeline.train.flops import StepFlops
from tests.conftest import write_training_shards
from tests.stage_runner import REPO, stage_overrides


@pytest.fixture(scope="module")
def shards(tiny_world, tmp_path_factory):
    return write_training_shards(tiny_world, tmp_path_factory.mktemp("plan") / "shards", samples=24, per_shard=12)


def config(tiny_world, shards, stage: str, **overrides) -> TrainConfig:
    overrides = {"model.projector": "null", **overrides}
    return load_config(TrainConfig, REPO / f"configs/tiny/{stage}.yaml",
                       stage_overrides(tiny_world, shards, shards.parent / "run", **overrides))


def skeleton(cfg: TrainConfig):
    """The Llava on the meta device, adapted and frozen as the run would be."""
    model = meta_llava(llava_config(cfg.model))
    if cfg.lora is not None:
        add_lora(model, cfg.lora)
    apply_freeze(model, cfg.trainable, lora=cfg.lora is not None)
    return model


def test_what_trains_has_one_answer_per_stage_and_the_flop_count_agrees(tiny_world, shards):
    stage1 = config(tiny_world, shards, "stage1")
    stage2 = config(tiny_world, shards, "stage2")
    lora = config(tiny_world, shards, "stage2", trainable="[projector]", **{"lora.rank": 4})
    answers = {name: (plan.llm_weights_train(c), plan.adapters_train(c), plan.caption_targets_can_be_cached(c))
               for name, c in (("stage1", stage1), ("stage2", stage2), ("lora", lora))}
    assert answers == {"stage1": (False, False, True), "stage2": (True, False, False), "lora": (False, True, False)}
    # the FLOP count charges the LLM's weight gradients exactly when its own weights train (not for LoRA)
    for name, c in (("stage1", stage1), ("stage2", stage2), ("lora", lora)):
        assert StepFlops.of(skeleton(c)).llm_trains == answers[name][0], name


def test_the_run_plan_sizes_the_run_once_from_the_manifests(tiny_world, shards):
    cfg = config(tiny_world, shards, "stage1", epochs=3)
    run = plan.run_plan(cfg, world_size=2)
    assert run.steps_per_epoch == batches_per_epoch(run.shard_sets, 2, cfg.loader) == 3  # 24 samples / (2 × 4)
    assert run.total_steps == 9 and run.meets_a_sample_twice
    capped = plan.run_plan(config(tiny_world, shards, "stage1", max_steps=2), world_size=2)
    assert capped.total_steps == 2 and not capped.meets_a_sample_twice


def test_caption_targets_are_cached_only_when_fixed_and_met_twice_and_ride_in_rows_when_the_llm_trains(
        tiny_world, shards):
    def caption_plan(stage, **overrides):
        cfg = config(tiny_world, shards, stage, **overrides)
        return plan.caption_plan(cfg, plan.run_plan(cfg, 2), skeleton(cfg))

    assert caption_plan("stage1", epochs=2) == plan.CaptionPlan(in_rows=False, cached=True)
    assert caption_plan("stage1", epochs=1) == plan.CaptionPlan(in_rows=False, cached=False)  # one pass: no reuse
    assert caption_plan("stage2", epochs=2) == plan.CaptionPlan(in_rows=True, cached=False)   # packed, LLM trains
    assert caption_plan("stage2", epochs=2, caption_forward="separate") == plan.CaptionPlan(False, False)
    # LoRA's adapters change the targets (never cached); its dropout keeps them out of the rows
    lora = {"trainable": "[projector]", "lora.rank": 4}
    assert caption_plan("stage2", epochs=2, **lora) == plan.CaptionPlan(in_rows=False, cached=False)
    plain = {"tga.align_on": "false", "tga.pair_on": "false"}  # plain LLaVA training: no caption targets
    assert caption_plan("stage2", **plain).describe() == "a separate forward"


def test_caption_forward_in_row_without_packed_rows_is_refused_in_the_config(tiny_world, shards):
    with pytest.raises(ConfigError, match="caption_forward=in_row puts the caption inputs in packed rows"):
        config(tiny_world, shards, "stage2", caption_forward="in_row", **{"loader.packing": "false"})
