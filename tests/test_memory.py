"""The memory plan (pipeline/train/memory.py): its activation model against the tensors autograd really
keeps, and the shipped 7B configs against an 80 GB GPU."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import CLIPVisionConfig, MistralConfig

from pipeline.config import load_config
from pipeline.model.assemble import apply_freeze, build_llava
from pipeline.train.config import TrainConfig
from pipeline.train.memory import GPUS, layer_bytes_per_token, main, plan, shapes


def tiny_config(world, stage: str, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, f"configs/tiny/{stage}.yaml", [
        f"model.llm={world.llm}", f"model.vision_tower={world.clip}", "model.projector=null",
        f"shards={world.root}", *overrides])


def saved_activation_bytes(model, tokens: int) -> int:
    """Bytes of the tensors autograd keeps for the backward of a language-model forward with
    output_hidden_states (parameters excluded: they are model states, not activations)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(10, 500, (1, tokens))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # the projector's output stands here
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.model.language_model(inputs_embeds=embeds, output_hidden_states=True)
    return sum(kept.values())


@pytest.mark.parametrize("stage", ["stage1", "stage2"])  # frozen LLM, training LLM
def test_the_activation_model_matches_what_autograd_keeps(tiny_world, stage):
    cfg = tiny_config(tiny_world, stage, "model.dtype=bf16")
    model = build_llava(cfg.model, "cpu").model
    apply_freeze(model, cfg.trainable)
    s = shapes(cfg)
    tokens = 256
    estimated = tokens * (s.layers * layer_bytes_per_token(s) + (s.layers + 1) * 2 * s.hidden)
    measured = saved_activation_bytes(model, tokens)
    assert estimated == pytest.approx(measured, rel=0.15), (estimated, measured)


@pytest.fixture(scope="module")
def folders_7b(tmp_path_factory):
    """Config-only folders of Mistral-7B-Instruct-v0.2 and CLIP ViT-L/14-336 (the plan reads no weights)."""
    root = tmp_path_factory.mktemp("7b")
    MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
                  rope_theta=1e6).save_pretrained(root / "llm")
    CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=336, patch_size=14, projection_dim=768).save_pretrained(root / "clip")
    return root


def config_7b(folders, name: str, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, f"configs/{name}.yaml", [
        f"model.llm={folders / 'llm'}", f"model.vision_tower={folders / 'clip'}", "model.projector=null",
        *overrides])


@pytest.mark.parametrize("name", ["stage1", "stage2", "stage2_lora"])
def test_the_shipped_7b_configs_fit_an_80gb_gpu(folders_7b, name):
    result = plan(config_7b(folders_7b, name), world_size=8, gpu="h100-80gb")
    assert result.fits(), result.text("h100-80gb")


def test_stage1_without_checkpointing_would_not_fit_and_the_cli_says_so(folders_7b, capsys):
    cfg = config_7b(folders_7b, "stage1", "model.gradient_checkpointing=false")
    assert not plan(cfg, world_size=8, gpu="h100-80gb").fits()
    frozen = shapes(cfg)
    trained = shapes(dataclasses.replace(cfg, trainable=["projector", "llm"]))
    assert layer_bytes_per_token(frozen) < layer_bytes_per_token(trained)  # frozen linears keep no input
    with pytest.raises(SystemExit) as exited:
        main(["--config", "configs/stage1.yaml", f"model.llm={folders_7b / 'llm'}",
              f"model.vision_tower={folders_7b / 'clip'}", "model.projector=null",
              "model.gradient_checkpointing=false", "--gpu", "a100-80gb"])
    out = capsys.readouterr().out
    assert exited.value.code == 3 and "a100-80gb: 79.2 GiB usable: typical DOES NOT FIT" in out
    assert "activations" in out and set(GPUS) >= {"a100-40gb", "a100-80gb", "h100-80gb", "h200"}


def test_the_plan_counts_the_caption_tokens_where_caption_forward_puts_them_in_the_rows(folders_7b):
    def caption_row(cfg):
        return [row for row in plan(cfg, world_size=8).rows if row[0].startswith("activations")][0][3]

    assert "caption tokens in the rows" in caption_row(config_7b(folders_7b, "stage2"))  # auto: the LLM trains
    assert "caption tokens" not in caption_row(config_7b(folders_7b, "stage2", "caption_forward=separate"))
    assert "caption tokens" not in caption_row(config_7b(folders_7b, "stage1"))  # frozen LLM: the separate forward
    assert "caption tokens" not in caption_row(config_7b(folders_7b, "stage2_lora"))  # LoRA dropout
    assert "caption tokens" in caption_row(config_7b(folders_7b, "stage2_lora", "lora.dropout=0.0"))
    in_row, separate = (plan(config_7b(folders_7b, "stage2", f"caption_forward={choice}"), 8).totals
                        for choice in ("in_row", "separate"))
    assert in_row[0] > separate[0] and in_row[1] > separate[1]
