"""The micro-step's two savings change no number: the caption forward that stops at the deepest
alignment layer gives the full forward's targets, and the LM loss from logits at labelled positions
only is transformers' loss over all logits (padded and packed batches)."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.data.batch import SampleEncoder, collate
from pipeline.data.shards import ShardSample
from pipeline.model.assemble import ModelConfig, apply_freeze, build_llava
from pipeline.model.lora import LoraConfig, add_lora
from pipeline.tga.loss import TGAConfig, pool_caption_targets
from pipeline.tga.prompt import IGNORE_INDEX
from pipeline.train.step import CaptionTargets, next_token_targets, tga_forward

LM_ONLY = TGAConfig(layers=[2], align_on=False, pair_on=False)


def _assembled(tiny_world):
    torch.manual_seed(0)
    return build_llava(ModelConfig(llm=tiny_world.llm, vision_tower=tiny_world.clip))


@pytest.fixture(scope="module")
def assembled(tiny_world):
    return _assembled(tiny_world)


@pytest.fixture(scope="module")
def samples(assembled, tiny_world):
    """Stage-2 records as the loader encodes them: multi-turn, text-only and image samples mixed;
    the retrieved text is the next record's first answer."""
    records = json.loads(tiny_world.stage2_json.read_text())[:8]
    encoder = SampleEncoder(assembled.tokenizer, assembled.image_processor,
                            num_image_tokens=assembled.num_image_tokens, template="tokenizer",
                            insert_retrieved=True, max_tokens=320)
    encoded = []
    for i, record in enumerate(records):
        image = (tiny_world.images / record["image"]).read_bytes() if "image" in record else None
        caption = record["conversations"][1]["value"] if image else ""
        retrieved = records[(i + 1) % len(records)]["conversations"][1]["value"]
        meta = {"key": f"s2_{i}", "conversations": record["conversations"], "image_caption": caption,
                "retrieved": [{"text": retrieved, "score": 0.5, "caption_id": f"c{i}"}] if image else []}
        encoded.append(encoder(ShardSample(meta["key"], image, meta)))
    assert any(e.pixel_values is None for e in encoded) and sum(e.pixel_values is not None for e in encoded) >= 4
    return encoded


def full_forward_targets(model, batch, layers):
    """Today's caption targets: every layer, the last hidden state after the final norm."""
    model.eval()
    try:
        with torch.no_grad():
            out = model.model(input_ids=batch.caption_input_ids, attention_mask=batch.caption_attention_mask,
                              output_hidden_states=True, use_cache=False)
    finally:
        model.train()
    return pool_caption_targets(out.hidden_states, batch.caption_spans, layers)


def layers_run(model, fn) -> list[int]:
    """Indices of the decoder layers that ran during `fn()`."""
    ran, hooks = [], []
    for index, layer in enumerate(model.model.language_model.layers):
        hooks.append(layer.register_forward_hook(lambda *_, i=index: ran.append(i)))
    try:
        fn()
    finally:
        for hook in hooks:
            hook.remove()
    return ran


@pytest.mark.parametrize("layers", [[2, 3, 4], [0, 1], [3, 6]], ids=["middle-band", "embeddings", "last-layer"])
def test_caption_forward_stops_at_the_deepest_alignment_layer_with_the_full_forwards_targets(
        assembled, samples, layers):
    model, batch = assembled.model, collate(samples, assembled.tokenizer.pad_token_id)
    config = model.config.text_config
    expected, expected_valid = full_forward_targets(model, batch, layers)
    result = {}
    ran = layers_run(model, lambda: result.update(zip("tv", CaptionTargets(layers, cached=False)(model, batch))))
    assert ran == list(range(max(max(layers), 1)))  # layer 6 is the last: then all of them, norm included
    assert config.num_hidden_layers == 6 and "tie_last_hidden_states" not in config.__dict__  # restored
    assert torch.equal(result["v"], expected_valid) and int(expected_valid.sum()) >= 4
    torch.testing.assert_close(result["t"], expected, rtol=1e-6, atol=1e-6)


def test_cached_stage1_targets_are_the_full_forwards_and_served_without_a_forward(assembled, samples):
    model, batch = assembled.model, collate(samples, assembled.tokenizer.pad_token_id)
    targets = CaptionTargets([2, 3, 4], cached=True, cache_size=len(batch))
    targets(model, batch)
    ran = layers_run(model, lambda: targets(model, batch))
    served, _ = targets(model, batch)
    assert ran == [] and targets.forwards == 1
    torch.testing.assert_close(served, full_forward_targets(model, batch, [2, 3, 4])[0], rtol=1e-6, atol=1e-6)


def test_truncated_caption_forward_runs_the_lora_adapters(tiny_world, samples):
    """peft injects the adapters into the Llava model itself: the shorter forward still runs them."""
    assembled = _assembled(tiny_world)
    model = assembled.model
    add_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.0))
    batch = collate(samples, assembled.tokenizer.pad_token_id)
    before, _ = full_forward_targets(model, batch, [2, 3, 4])
    with torch.no_grad():  # lora_B starts at zero (a no-op adapter): make the adapters matter
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.5)
    expected, _ = full_forward_targets(model, batch, [2, 3, 4])
    result, _ = CaptionTargets([2, 3, 4], cached=False)(model, batch)
    assert not torch.allclose(expected, before, atol=1e-3)
    torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)


def test_next_token_targets_keep_exactly_the_positions_before_a_label():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX],
                           [IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX, 9]])
    keep, targets = next_token_targets(labels)
    assert keep.tolist() == [[False, True, True, False, False], [True, False, False, True, False]]
    assert targets.tolist() == [7, 8, 5, 9]


@pytest.mark.parametrize("layout", ["padded", "packed-one-row", "packed-rows"])
def test_lm_loss_from_labelled_logits_equals_transformers_loss_over_all_logits(assembled, samples, layout):
    model = assembled.model
    apply_freeze(model, ["projector", "llm"])  # stage 2: gradients through the LLM and the LM head
    batch = collate(samples, assembled.tokenizer.pad_token_id, packed=layout != "padded",
                    single_row=layout == "packed-one-row")
    model.zero_grad(set_to_none=True)
    full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                 pixel_values=batch.pixel_values, labels=batch.labels, use_cache=False)
    full.loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss, parts = tga_forward(model, batch, CaptionTargets([2], cached=False), 0.0, LM_ONLY)
    loss.backward()
    assert full.logits.shape[:2] == batch.input_ids.shape  # what the kept logits replace
    torch.testing.assert_close(loss, full.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(parts["lm"], full.loss.detach(), rtol=1e-6, atol=1e-6)
    assert sorted(n for n, p in model.named_parameters() if p.grad is not None) == sorted(expected)
    assert "lm_head.weight" in expected and "model.multi_modal_projector.linear_1.weight" in expected
    for name, grad in expected.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-5, atol=1e-7, msg=name)


def test_tga_loss_is_unchanged_by_the_labelled_logits(assembled, samples):
    """The whole objective, TGA terms on: the LM part now comes from the kept logits."""
    model = assembled.model
    batch = collate(samples, assembled.tokenizer.pad_token_id)
    cfg = TGAConfig(layers=[2, 3, 4])
    loss, parts = tga_forward(model, batch, CaptionTargets(cfg.layers, cached=False), 0.25, cfg)
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     pixel_values=batch.pixel_values, labels=batch.labels, use_cache=False)
    align_w, pair_w = cfg.term_weights(0.25)
    assert float(parts["n_valid"]) >= 4 and float(parts["align"]) > 0
    torch.testing.assert_close(parts["lm"], full.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.detach(), full.loss + align_w * parts["align"] + pair_w * parts["pair"],
                               rtol=1e-6, atol=1e-6)
