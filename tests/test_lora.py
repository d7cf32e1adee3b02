"""LoRA stage 2 (pipeline/model/lora.py): adapters on the LLM through peft, TGA with the adapted
model on both forwards, adapter-only checkpoints that resume exactly, a merged export that loads
without peft and an adapter export that loads with `peft.PeftModel.from_pretrained`."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from pipeline.config import ConfigError, load_config
from pipeline.data.batch import SampleEncoder, collate
from pipeline.data.shards import iter_shard
from pipeline.export import main as export_main
from pipeline.model.assemble import ModelConfig, apply_freeze, build_llava
from pipeline.model.lora import LoraConfig, add_lora, is_lora_parameter
from pipeline.tga.loss import TGAConfig
from pipeline.train.checkpoint import export_full_state_dict, saved_steps
from pipeline.train.config import TrainConfig
from pipeline.train.plan import adapters_train, caption_targets_can_be_cached, llm_weights_train
from pipeline.train.step import CaptionTargets, tga_forward
from tests.conftest import write_training_shards
from tests.stage_runner import REPO, consumed_keys, metrics_by_step, stage_overrides
from tests.test_resume import reference_beside_a_killed_run, steps_done

LAYERS = [2, 3, 4]
LORA = LoraConfig(rank=4, alpha=8, dropout=0.0)


def trains(name: str) -> bool:
    return is_lora_parameter(name) or "multi_modal_projector" in name


@pytest.fixture(scope="module")
def shards(tiny_world, tmp_path_factory):
    return write_training_shards(tiny_world, tmp_path_factory.mktemp("lora") / "shards", samples=48,
                                 per_shard=12, stage="stage2")


def test_only_adapters_and_projector_get_gradients_and_the_caption_forward_sees_the_adapters(
        tiny_world, shards):
    assembled = build_llava(ModelConfig(llm=tiny_world.llm, vision_tower=tiny_world.clip, dtype="fp32",
                                        attn_implementation="sdpa"), "cpu")
    model = assembled.model
    add_lora(model, LORA)
    apply_freeze(model, ["projector"], lora=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if trains(n)}
    assert not any(is_lora_parameter(n) for n, _ in model.model.vision_tower.named_parameters())
    encoder = SampleEncoder(assembled.tokenizer, assembled.image_processor,
                            num_image_tokens=assembled.num_image_tokens, template="tokenizer",
                            insert_retrieved=True, max_tokens=256)
    samples = [encoder(s) for s in list(iter_shard(shards / "train-000000.tar"))[:4]]
    batch = collate([s for s in samples if s.pixel_values is not None][:2], assembled.tokenizer.pad_token_id)
    targets = CaptionTargets(LAYERS, cached=False)
    before, _ = targets(model, batch)
    with torch.no_grad():  # peft starts lora_B at 0 (an identity adapter): give it a value
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.5)
    after, _ = targets(model, batch)
    assert not torch.allclose(before, after), "the text-only forward must run with the adapters"
    loss, _ = tga_forward(model, batch, targets, 0.0, TGAConfig(layers=LAYERS))
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(trains(n) for n in with_grad)
    assert any(".lora_A." in n for n in with_grad) and any("multi_modal_projector" in n for n in with_grad)


def test_lora_with_the_whole_llm_trainable_is_refused_and_the_7b_lora_config_loads(tiny_world, shards):
    with pytest.raises(ConfigError, match="lora"):
        load_config(TrainConfig, REPO / "configs/tiny/stage2.yaml",
                    stage_overrides(tiny_world, shards, shards.parent / "run",
                                    **{"lora.rank": 4, "model.projector": "null"}))
    cfg = load_config(TrainConfig, REPO / "configs/stage2_lora.yaml", [
        f"shards={shards}", f"model.llm={tiny_world.llm}", f"model.vision_tower={tiny_world.clip}",
        "model.projector=null"])
    assert cfg.lora.rank == 128 and cfg.trainable == ["projector"] and adapters_train(cfg)
    assert not llm_weights_train(cfg) and not caption_targets_can_be_cached(cfg)  # the adapters change the targets


@pytest.mark.slow
def test_lora_stage2_resumes_exactly_and_exports_a_merged_model_and_a_peft_adapter(tiny_world, shards, tmp_path):
    def overrides(run):
        return stage_overrides(tiny_world, shards, run, **{
            "loader.batch_size": 2, "max_steps": 6, "model.projector": "null", "trainable": "[projector]",
            "lora.rank": 8, "lora.alpha": 16, "optim.lr": 1e-3, "checkpoint.every_steps": 2,
            "tracking.plot_every_steps": 0})

    reference, run = tmp_path / "reference", tmp_path / "run"
    reference_beside_a_killed_run("stages.stage2_instruct", "configs/tiny/stage2.yaml", overrides, reference, run,
                                  lambda run: 2 in saved_steps(run / "checkpoints") and steps_done(run) >= 3,
                                  launch_script="stage2.sh")

    metrics = metrics_by_step(reference)
    assert sorted(metrics) == list(range(1, 7)) and all(m["grad_norm"] > 0 for m in metrics.values())
    # the checkpoint holds what trains: adapters and projector, none of the frozen LLM or tower
    saved = export_full_state_dict(reference / "checkpoints", 6)
    assert saved and all(trains(name) for name in saved), sorted(saved)[:5]
    assert any(".lora_A." in name for name in saved)
    tracking = json.loads((reference / "mlflow_run.json").read_text())
    params = MlflowClient(tracking["tracking_uri"]).get_run(tracking["run_id"]).data.params
    assert params["lora.rank"] == "8" and params["lora.alpha"] == "16"
    assert int(params["trainable_parameters"]) == sum(t.numel() for t in saved.values())

    resumed = metrics_by_step(run)
    for step, row in metrics.items():
        for part in ("lm", "align", "pair", "grad_norm"):
            assert resumed[step][part] == row[part], (step, part)  # bit-identical on CPU
    for rank in (0, 1):
        assert consumed_keys(run, rank) == consumed_keys(reference, rank)

    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    for out, fmt in ((merged, "hf"), (adapter, "lora")):  # the CLI, in this process
        # fp32: the merged weights equal base + adapters only before rounding (bf16 is the default)
        export_main(["--checkpoint", str(reference / "checkpoints"), "--out", str(out), "--format", fmt,
                     "--dtype", "fp32"])
    weights = load_file(merged / "model.safetensors")
    assert not any("lora" in name or "base_layer" in name for name in weights)
    # the merged folder is a plain transformers model: it loads with peft unavailable
    subprocess.run([sys.executable, "-c", "import sys; sys.modules['peft'] = None\n"
                    "from transformers import LlavaForConditionalGeneration as L\n"
                    f"L.from_pretrained({str(merged)!r})"], check=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8

    processor = AutoProcessor.from_pretrained(merged)
    plain = LlavaForConditionalGeneration.from_pretrained(merged).eval()
    # it trained: on the batches of the first steps, the trained model's loss is below the one logged
    info = json.loads((merged / "tga_training.json").read_text())["prompt"]
    encoder = SampleEncoder(processor.tokenizer, processor.image_processor, pad_to_square=False,
                            num_image_tokens=plain.config.image_seq_length, template=info["template"],
                            insert_retrieved=info["insert_retrieved"], max_tokens=info["max_tokens"])
    by_key = {s.key: s for tar in sorted(shards.glob("*.tar")) for s in iter_shard(tar)}
    for step in (1, 2, 3):
        losses = []
        for rank in (0, 1):
            batch = collate([encoder(by_key[k]) for k in consumed_keys(reference, rank)[step - 1]],
                            processor.tokenizer.pad_token_id)
            with torch.no_grad():
                losses.append(plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    pixel_values=batch.pixel_values, labels=batch.labels).loss.item())
        assert sum(losses) / 2 < metrics[step]["lm"], step

    peft = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(adapter / "base"), adapter).eval()
    records = json.loads((tiny_world.root / "eval" / "benign_vqa.json").read_text())[:3]
    for record in records:  # the tiny eval prompts, image and question as the chat template renders them
        image = Image.open(tiny_world.images / record["image"]).convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record[
            "conversations"][0]["value"].replace("<image>", "").strip()}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=image, text=text, return_tensors="pt")
        with torch.no_grad():
            a, b = plain(**inputs).logits, peft(**inputs).logits
        # merging adds B @ A into each weight: the same function up to fp32 rounding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_adapters_take_the_dtype_of_a_bf16_model_so_zero3_sees_one_dtype(tiny_world):
    """peft's default upcasts adapters to fp32 beside bf16 base weights; ZeRO-3 then refuses the
    model at deepspeed.initialize (the bf16 lane, tests/test_bf16.py, runs that for real)."""
    assembled = build_llava(ModelConfig(llm=tiny_world.llm, vision_tower=tiny_world.clip, dtype="bf16",
                                        attn_implementation="sdpa"), "cpu")
    add_lora(assembled.model, LORA)
    adapters = {n: p.dtype for n, p in assembled.model.named_parameters() if is_lora_parameter(n)}
    assert adapters and set(adapters.values()) == {torch.bfloat16}
    assert {p.dtype for p in assembled.model.parameters()} == {torch.bfloat16}
