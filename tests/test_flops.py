"""Model FLOPs per step (what MFU is computed from) agree with the configuration, by hand."""
from __future__ import annotations

import pytest
import torch

from pipeline.data.batch import EncodedSample, collate
from pipeline.model.assemble import ModelConfig, apply_freeze, build_llava
from pipeline.train.flops import StepFlops, peak_flops_per_device, peak_tflops_of
from pipeline.train.metrics import StepMeter


@pytest.fixture(scope="module")
def assembled(tiny_world):
    return build_llava(ModelConfig(llm=tiny_world.llm, vision_tower=tiny_world.clip))


def llama_matmul_params(text) -> int:
    """Weights a token multiplies through in a Llama decoder, from the config alone."""
    d, i, heads, kv = text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or d // heads
    attention = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d
    norms = 2 * d
    return text.num_hidden_layers * (attention + 3 * d * i + norms) + d + text.vocab_size * d


def test_parameter_counts_follow_the_config(assembled):
    model = assembled.model
    apply_freeze(model, ["projector"])
    flops = StepFlops.of(model)
    assert flops.llm_params == llama_matmul_params(model.config.text_config)
    vision = model.config.vision_config
    assert flops.vision_tokens == (vision.image_size // vision.patch_size) ** 2 + 1
    assert flops.projector_params == sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert not flops.llm_trains
    apply_freeze(model, ["projector", "llm"])
    try:
        assert StepFlops.of(model).llm_trains
    finally:
        apply_freeze(model, ["projector"])


def test_step_flops_count_weights_attention_and_the_frozen_parts_by_hand():
    flops = StepFlops(llm_params=1000, llm_layers=2, llm_hidden=8, llm_trains=False, vision_params=100,
                      vision_layers=1, vision_hidden=4, vision_tokens=5, projector_params=10)
    # frozen LLM: 4 FLOPs per weight per token; causal attention 2·L·d·n² forward, x3 with grads
    assert flops.step([3, 2], images=0) == 4 * 1000 * 5 + 3 * 2 * 2 * 8 * (9 + 4)
    trains = StepFlops(**{**flops.__dict__, "llm_trains": True})
    assert trains.step([3], 0) - flops.step([3], 0) == 2 * 1000 * 3  # weight gradients
    image = 2 * 100 * 5 + 4 * 1 * 4 * 25 + 6 * 10 * 4  # tower forward (+ attention) and projector
    assert flops.step([3], images=1) - flops.step([3], 0) == image
    caption = 2 * 1000 * 4 + 2 * 2 * 8 * 16  # no-grad text forward of a 4-token caption
    assert flops.step([3], 0, caption_lens=[4]) - flops.step([3], 0) == caption

    # the LM head (200 of the 1000) runs only where a label follows; the caption forward stops at layer 1
    # of 2 and has no head
    shaped = StepFlops(**{**flops.__dict__, "lm_head_params": 200, "caption_layers": 1})
    assert shaped.step([3, 2], 0) == flops.step([3, 2], 0)  # every position read: as before
    assert shaped.step([3, 2], 0, logit_positions=1) == 4 * (800 * 5 + 200 * 1) + 3 * 2 * 2 * 8 * (9 + 4)
    assert shaped.step([3], 0, caption_lens=[4]) - shaped.step([3], 0) == 2 * 800 * 1 / 2 * 4 + 2 * 1 * 8 * 16


def test_meter_reports_tflops_and_mfu_against_the_given_peak(assembled):
    text = type("T", (), {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "image_span": None,
                          "retrieved_span": None, "caption_input_ids": [], "caption_span": None})()
    sample = EncodedSample("k", text, pixel_values=None)
    meter = StepMeter(StepFlops.of(assembled.model), peak_flops=1e9)
    for packed in (False, True):
        meter.micro(collate([sample, sample], pad_id=0, packed=packed), {})
    report = meter.report()
    assert meter.tokens == 12
    assert report["model_tflops_per_second"] > 0
    assert report["mfu"] == pytest.approx(report["model_tflops_per_second"] * 1e12 / 1e9)
    assert "mfu" not in StepMeter(StepFlops.of(assembled.model)).report()


def test_peak_is_the_override_or_unknown_off_cuda():
    assert peak_flops_per_device(torch.device("cpu")) is None
    assert peak_flops_per_device(torch.device("cpu"), override_tflops=100.0) == 1e14


# Names as torch.cuda.get_device_name reports them; dense bf16 of the vendor data sheets.
@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H800", 989.0), ("NVIDIA H800 PCIe", 756.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA H20", 148.0),
    ("NVIDIA A100-SXM4-40GB", 312.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA A800-SXM4-80GB", 312.0), ("NVIDIA A800 80GB PCIe", 312.0),
    ("NVIDIA B200", 2250.0), ("NVIDIA GB200", 2500.0),
    ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0), ("NVIDIA A10", 125.0),
    ("NVIDIA A10G", None), ("Tesla V100-SXM2-32GB", None), ("NVIDIA GeForce RTX 4090", None)])
def test_peak_tflops_match_the_specific_part_before_its_family(name, tflops):
    assert peak_tflops_of(name) == tflops


def test_lora_counts_a_frozen_base_and_six_flops_per_adapter_weight_per_token(tiny_world):
    from pipeline.model.lora import LoraConfig, add_lora, is_lora_parameter

    assembled = build_llava(ModelConfig(llm=tiny_world.llm, vision_tower=tiny_world.clip))
    add_lora(assembled.model, LoraConfig(rank=2, alpha=4, dropout=0.0))
    apply_freeze(assembled.model, ["projector"], lora=True)
    flops = StepFlops.of(assembled.model)
    adapters = sum(p.numel() for n, p in assembled.model.named_parameters() if is_lora_parameter(n))
    assert flops.adapter_params == adapters > 0
    assert flops.llm_params == llama_matmul_params(assembled.model.config.text_config)  # the base alone
    assert not flops.llm_trains, "under LoRA the base weights are frozen: 4N, not 6N"
    base = StepFlops(**{**flops.__dict__, "adapter_params": 0})
    assert flops.step([3, 2], 0) - base.step([3, 2], 0) == 6 * adapters * 5


def test_packed_attention_is_counted_per_sample_not_per_row():
    flops = StepFlops(llm_params=0, llm_layers=1, llm_hidden=1, llm_trains=False, vision_params=0,
                      vision_layers=1, vision_hidden=1, vision_tokens=1, projector_params=0)
    assert flops.step([3, 2], 0) == 3 * 2 * (9 + 4) < 3 * 2 * 25


def test_meter_sums_loss_parts_as_tensors_and_reads_them_once_per_report(assembled):
    """No host sync per micro-step: parts stay tensors until the step is reported, and the numbers
    equal Python float sums (float64, as before)."""
    text = type("T", (), {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "image_span": None,
                          "retrieved_span": None, "caption_input_ids": [], "caption_span": None})()
    batch = collate([EncodedSample("k", text, pixel_values=None)], pad_id=0)
    meter = StepMeter()
    values = [(0.1, 0.7), (0.2, 0.3), (0.3, 0.9)]
    for lm, cosine in values:
        meter.micro(batch, {"lm": torch.tensor(lm), "cos_layer/2": torch.tensor(cosine), "n_valid": torch.tensor(2.0)})
    assert isinstance(meter.parts["lm"], torch.Tensor) and isinstance(meter.valid_samples, torch.Tensor)
    report = meter.report()
    assert report["lm"] == sum(float(torch.tensor(lm)) for lm, _ in values) / 3
    expected = sum(float(torch.tensor(c)) * 2.0 for _, c in values) / 6.0
    assert report["cos_layer/2"] == expected
