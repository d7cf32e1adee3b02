"""Padding-free packing: one row per micro-batch, position ids restarting per sample, attention kept
inside each sample (transformers' block-diagonal mask on CPU). It must train exactly like the
padded batch: same loss, same TGA parts, same gradients. The segment boundaries flash-attention
needs are built once, for the language model only; the TGA captions can ride in the row."""
from __future__ import annotations

import pytest
import torch
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from pipeline.data.batch import SampleEncoder, collate
from pipeline.data.shards import iter_shard
from pipeline.model.assemble import ModelConfig, apply_freeze, build_llava
from pipeline.model.lora import LoraConfig, add_lora
from pipeline.tga.loss import TGAConfig, pool_caption_targets
from pipeline.tga.prompt import IGNORE_INDEX
from pipeline.train.flops import StepFlops
from pipeline.train.metrics import batch_flops
from pipeline.train.step import CaptionTargets, captions_in_row, tga_forward
from tests.conftest import write_training_shards

LAYERS = [2, 3, 4]


@pytest.fixture(scope="module")
def assembled(tiny_world):
    torch.manual_seed(0)
    assembled = build_llava(ModelConfig(llm=tiny_world.llm, vision_tower=tiny_world.clip))
    apply_freeze(assembled.model, ["projector", "llm"])  # stage 2: gradients through the whole LLM
    return assembled


@pytest.fixture(scope="module")
def samples(assembled, tiny_world, tmp_path_factory):
    """Stage-2 samples of different lengths: multi-turn, text-only and image samples mixed."""
    shards = write_training_shards(tiny_world, tmp_path_factory.mktemp("pack"), samples=40, per_shard=40,
                                   stage="stage2")
    encoder = SampleEncoder(assembled.tokenizer, assembled.image_processor,
                            num_image_tokens=assembled.num_image_tokens, template="tokenizer",
                            insert_retrieved=True, max_tokens=320)
    encoded = [encoder(s) for s in iter_shard(shards / "train-000000.tar")]
    text_only = [e for e in encoded if e.pixel_values is None][:2]
    with_image = [e for e in encoded if e.pixel_values is not None][:4]
    picked = [with_image[0], text_only[0], with_image[1], with_image[2], text_only[1], with_image[3]]
    assert len({len(e.text.input_ids) for e in picked}) > 2, "lengths must differ for padding to matter"
    return picked


def forward(model, batch, cfg=TGAConfig(layers=LAYERS)):
    model.zero_grad(set_to_none=True)
    loss, parts = tga_forward(model, batch, CaptionTargets(cfg.layers, cached=False), 0.25, cfg)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), parts, grads


def test_packed_row_restarts_positions_and_keeps_every_token_once(assembled, samples):
    pad = assembled.tokenizer.pad_token_id
    packed = collate(samples, pad, packed=True)
    padded = collate(samples, pad)
    lengths = [len(s.text.input_ids) for s in samples]
    assert packed.input_ids.shape == (1, sum(lengths)) and packed.attention_mask is None
    assert padded.input_ids.numel() > sum(lengths), "the padded batch has padding to remove"
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    assert packed.position_ids[0, starts].eq(0).all()
    assert packed.position_ids[0].tolist() == [p for n in lengths for p in range(n)]
    for i, start in enumerate(starts.tolist()):
        row = packed.input_ids[0, start:start + lengths[i]]
        assert torch.equal(row, padded.input_ids[i, :lengths[i]])
        assert packed.labels[0, start] == IGNORE_INDEX  # no target across the sample boundary
        image = packed.image_spans[i].tolist()
        assert image == (padded.image_spans[i] + (start if samples[i].pixel_values is not None else 0)).tolist()
    assert packed.pixel_values.shape[0] == sum(s.pixel_values is not None for s in samples)


@pytest.mark.parametrize("single_row", [True, False], ids=["one-row-varlen-layout", "rows-for-dense-attention"])
def test_packed_and_padded_batches_give_the_same_loss_parts_and_gradients(assembled, samples, single_row):
    pad = assembled.tokenizer.pad_token_id
    padded_loss, padded_parts, padded_grads = forward(assembled.model, collate(samples, pad))
    packed = collate(samples, pad, packed=True, single_row=single_row)
    packed_loss, packed_parts, packed_grads = forward(assembled.model, packed)
    assert float(padded_parts["n_valid"]) == 4 and float(padded_parts["n_pair_valid"]) == 4
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)
    for name in ("lm", "align", "pair", *(f"cos_layer/{layer}" for layer in LAYERS)):
        torch.testing.assert_close(torch.as_tensor(packed_parts[name]), torch.as_tensor(padded_parts[name]),
                                   rtol=1e-5, atol=1e-5, msg=name)
    assert sorted(packed_grads) == sorted(padded_grads)
    assert any(n.startswith("model.language_model.") for n in packed_grads)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_attention_does_not_cross_samples_in_a_packed_row(assembled, samples):
    """Changing every token of the first sample leaves the second sample's logits unchanged."""
    pad = assembled.tokenizer.pad_token_id
    first, second = samples[1], samples[0]  # text-only first: no image features to realign
    batch = collate([first, second], pad, packed=True)
    changed = batch.input_ids.clone()
    n = len(first.text.input_ids)
    shifted = (changed[0, :n] + 7) % assembled.model.config.text_config.vocab_size
    image_token = assembled.model.config.image_token_id
    changed[0, :n] = torch.where(shifted == image_token, (shifted + 1) % image_token, shifted)
    model = assembled.model.eval()
    try:
        with torch.no_grad():
            kwargs = dict(attention_mask=None, use_cache=False)
            a = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                      pixel_values=batch.pixel_values, **kwargs).logits
            b = model(input_ids=changed, position_ids=batch.position_ids,
                      pixel_values=batch.pixel_values, **kwargs).logits
    finally:
        model.train()
    assert not torch.allclose(a[0, :n], b[0, :n])
    torch.testing.assert_close(a[0, n:], b[0, n:], rtol=1e-5, atol=1e-5)


def test_rows_for_dense_attention_are_as_long_as_the_longest_sample_and_hold_every_sample_once(assembled, samples):
    pad = assembled.tokenizer.pad_token_id
    packed = collate(samples, pad, packed=True, single_row=False)
    lengths = {s.key: len(s.text.input_ids) for s in samples}
    assert packed.input_ids.shape[1] == max(lengths.values())
    assert packed.input_ids.shape[0] < len(samples)  # fewer rows than the padded batch
    assert sorted(packed.keys) == sorted(lengths)
    assert packed.seq_lens.tolist() == [lengths[k] for k in packed.keys]
    for key, row, (start, end) in zip(packed.keys, packed.span_rows.tolist(), packed.image_spans.tolist()):
        sample = next(s for s in samples if s.key == key)
        if sample.text.image_span is not None:  # the span still covers the image tokens
            image_token = assembled.model.config.image_token_id
            assert packed.input_ids[row, start:end].eq(image_token).all()
    images = [s.pixel_values for k in packed.keys for s in samples if s.key == k and s.pixel_values is not None]
    assert torch.equal(packed.pixel_values, torch.stack(images)), "images follow the placed order"


@pytest.mark.parametrize("single_row,in_row", [(True, False), (False, False), (True, True), (False, True)],
                         ids=["one-row", "rows", "one-row+captions", "rows+captions"])
def test_segment_boundaries_are_the_ones_transformers_derives_from_position_ids(assembled, samples, single_row,
                                                                                in_row):
    """cu_seq_lens / max_length built once in the collate are what flash-attention's varlen path
    would otherwise derive from the position ids in every layer (prepare_fa_kwargs_from_position_ids)."""
    batch = collate(samples, assembled.tokenizer.pad_token_id, packed=True, single_row=single_row,
                    captions_in_row=in_row)
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch.position_ids)
    assert batch.cu_seq_lens.dtype == torch.int32 and torch.equal(batch.cu_seq_lens, cu_q) and torch.equal(cu_q, cu_k)
    assert isinstance(batch.max_length, int) and batch.max_length == int(max_q)
    assert collate(samples, assembled.tokenizer.pad_token_id).cu_seq_lens is None  # padded: the mask says it


def test_varlen_lengths_reach_the_llm_attention_and_never_the_vision_tower(assembled, samples):
    batch = collate(samples, assembled.tokenizer.pad_token_id, packed=True)
    llava = assembled.model.model
    seen: dict[str, dict] = {}
    watched = {"llm attention": llava.language_model.layers[0].self_attn, "vision tower": llava.vision_tower,
               "vision attention": llava.vision_tower.encoder.layers[0].self_attn}

    def record(name):
        return lambda module, args, kwargs: seen.setdefault(name, dict(kwargs)) and None

    hooks = [module.register_forward_pre_hook(record(name), with_kwargs=True) for name, module in watched.items()]
    try:
        forward(assembled.model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    assert set(seen) == set(watched)
    assert torch.equal(seen["llm attention"]["cu_seq_lens_q"], batch.cu_seq_lens)
    assert seen["llm attention"]["max_length_k"] == batch.max_length
    for name in ("vision tower", "vision attention"):
        assert not [key for key in seen[name] if "seq_len" in key or "max_length" in key], name


def test_the_vision_tower_keeps_only_the_hidden_state_the_projector_reads(assembled, samples):
    """The engine asks for hidden states (TGA reads the LLM's); the tower must not keep all of its
    own for that, and the image features stay those of vision_feature_layer."""
    batch = collate(samples, assembled.tokenizer.pad_token_id, packed=True)
    llava = assembled.model.model
    kept = []
    hook = llava.vision_tower.register_forward_hook(
        lambda module, args, output: kept.append([h is not None for h in output.hidden_states]))
    try:
        loss, parts, _ = forward(assembled.model, batch)
    finally:
        hook.remove()
    layers = assembled.model.config.vision_config.num_hidden_layers
    assert kept and all(len(flags) == layers + 1 and sum(flags) == 1 for flags in kept)
    assert kept[0][assembled.model.config.vision_feature_layer]
    with torch.no_grad():
        everything = llava.vision_tower(batch.pixel_values, output_hidden_states=True).hidden_states
        features = llava.get_image_features(pixel_values=batch.pixel_values, vision_feature_layer=-2,
                                            vision_feature_select_strategy="default").pooler_output
    torch.testing.assert_close(features[0], llava.multi_modal_projector(everything[-2][:, 1:])[0])


def test_captions_in_the_packed_row_are_segments_of_their_own_after_the_samples(assembled, samples):
    pad = assembled.tokenizer.pad_token_id
    plain = collate(samples, pad, packed=True)
    batch = collate(samples, pad, packed=True, captions_in_row=True)
    n = plain.input_ids.shape[1]
    assert torch.equal(batch.input_ids[:, :n], plain.input_ids), "the samples keep their layout"
    assert batch.caption_input_ids is None and batch.labels[0, n:].eq(IGNORE_INDEX).all()
    placed = [next(s for s in samples if s.key == key) for key in batch.keys]
    start = n
    for i, sample in enumerate(placed):
        caption = sample.text.caption_input_ids
        assert int(batch.caption_lens[i]) == len(caption)
        if not caption:
            assert batch.caption_spans[i].tolist() == [0, 0]
            continue
        assert batch.input_ids[0, start:start + len(caption)].tolist() == caption
        assert batch.position_ids[0, start:start + len(caption)].tolist() == list(range(len(caption)))
        span = sample.text.caption_span
        assert batch.caption_spans[i].tolist() == [start + span[0], start + span[1]]
        start += len(caption)
    assert start == batch.input_ids.shape[1] and sum(1 for s in placed if s.text.caption_input_ids) >= 4


@pytest.mark.parametrize("single_row", [True, False], ids=["one-row", "rows-for-dense-attention"])
def test_captions_in_the_row_give_the_separate_forwards_targets_loss_and_gradients(assembled, samples, single_row):
    """One forward for both: the caption segments' pooled hidden states (SDPA's block-diagonal mask
    here, varlen under flash) are the text-only forward's targets, so loss and gradients match."""
    pad = assembled.tokenizer.pad_token_id
    separate = collate(samples, pad, packed=True, single_row=single_row)
    in_row = collate(samples, pad, packed=True, single_row=single_row, captions_in_row=True)
    assert in_row.caption_rows is not None and separate.caption_rows is None
    model, cfg = assembled.model, TGAConfig(layers=LAYERS)
    targets, valid = CaptionTargets(cfg.layers, cached=False)(model, separate)
    with torch.no_grad():
        out = model(input_ids=in_row.input_ids, position_ids=in_row.position_ids, pixel_values=in_row.pixel_values,
                    output_hidden_states=True, use_cache=False)
    row_targets, row_valid = pool_caption_targets(out.hidden_states, in_row.caption_spans, cfg.layers,
                                                  in_row.caption_rows)
    assert torch.equal(row_valid, valid) and int(valid.sum()) >= 4
    torch.testing.assert_close(row_targets, targets, rtol=1e-5, atol=1e-5)
    separate_loss, separate_parts, separate_grads = forward(model, separate)
    row_loss, row_parts, row_grads = forward(model, in_row)
    torch.testing.assert_close(row_loss, separate_loss, rtol=1e-5, atol=1e-5)
    for name in ("lm", "align", "pair", *(f"cos_layer/{layer}" for layer in LAYERS)):
        torch.testing.assert_close(torch.as_tensor(row_parts[name]), torch.as_tensor(separate_parts[name]),
                                   rtol=1e-5, atol=1e-5, msg=name)
    assert sorted(row_grads) == sorted(separate_grads)
    for name, grad in separate_grads.items():
        torch.testing.assert_close(row_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_caption_forward_auto_rides_in_the_row_when_the_llm_trains_on_packed_rows_without_dropout(
        assembled, tiny_world):
    model = assembled.model
    assert captions_in_row("auto", packed=True, llm_trains=True, model=model)
    assert not captions_in_row("auto", packed=False, llm_trains=True, model=model)
    assert not captions_in_row("auto", packed=True, llm_trains=False, model=model)  # stage 1: the shallow forward
    assert not captions_in_row("separate", packed=True, llm_trains=True, model=model)
    assert captions_in_row("in_row", packed=True, llm_trains=False, model=model)
    with pytest.raises(ValueError, match="loader.packing=true"):
        captions_in_row("in_row", packed=False, llm_trains=True, model=model)
    torch.manual_seed(0)
    lora = build_llava(ModelConfig(llm=tiny_world.llm, vision_tower=tiny_world.clip))
    add_lora(lora.model, LoraConfig(rank=4, alpha=8, dropout=0.05))
    assert not captions_in_row("auto", packed=True, llm_trains=True, model=lora.model)
    with pytest.raises(ValueError, match=r"dropout on \(.*lora_dropout.*caption_forward=separate"):
        captions_in_row("in_row", packed=True, llm_trains=True, model=lora.model)


def test_model_flops_count_caption_segments_as_row_tokens_and_a_separate_forward_only_when_it_ran(assembled, samples):
    pad = assembled.tokenizer.pad_token_id
    flops = StepFlops.of(assembled.model, caption_layers=4)
    separate, in_row = (collate(samples, pad, packed=True, captions_in_row=r) for r in (False, True))
    captions = [len(s.text.caption_input_ids) for s in (next(x for x in samples if x.key == k) for k in separate.keys)
                if s.text.caption_input_ids]
    images, logits = separate.pixel_values.shape[0], int((separate.labels[:, 1:] != IGNORE_INDEX).sum())
    lengths = separate.seq_lens.tolist()
    assert batch_flops(flops, separate, True) == flops.step(lengths, images, captions, logit_positions=logits)
    assert batch_flops(flops, separate, False) == flops.step(lengths, images, [], logit_positions=logits)
    assert batch_flops(flops, in_row, False) == flops.step(lengths + captions, images, [], logit_positions=logits)
