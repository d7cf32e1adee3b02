"""torch_varlen (pipeline/model/attention.py): torch's own flash kernels behind transformers' attention
interface. `varlen_attn` has no CPU kernel, so the plumbing is tested around it: a reference of its
semantics (causal attention inside each segment of cu_seq_lens, grouped KV heads shared) stands in
for it, and a whole Llava forward + backward through torch_varlen must equal SDPA with the
block-diagonal mask (outputs, TGA loss parts, gradients) — for one packed row, first-fit rows, the
captions in the row, a right-padded batch and decoding with a cache — while the kernel receives
exactly the batch's boundaries. The tiny LLM has grouped-query attention (4 query, 2 KV heads)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.batch import SampleEncoder, collate
from pipeline.data.shards import iter_shard
from pipeline.model import attention
from pipeline.model.assemble import ModelConfig, apply_freeze, build_llava, packs_one_row, resolve_attention
from pipeline.tga.loss import TGAConfig
from pipeline.train.step import CaptionTargets, tga_forward
from tests.conftest import write_training_shards

LAYERS = [2, 3, 4]


class ReferenceVarlen:
    """varlen_attn's documented semantics on CPU, recording what each call received."""

    def __init__(self):
        self.calls = []

    def __call__(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                 window_size=(-1, -1), enable_gqa=False):
        self.calls.append({"cu_seq_q": cu_seq_q.clone(), "cu_seq_k": cu_seq_k.clone(), "max_q": max_q,
                           "max_k": max_k, "window_size": tuple(window_size), "enable_gqa": enable_gqa,
                           "heads": (query.shape[1], key.shape[1]), "dtype": query.dtype})
        assert query.dim() == 3 and cu_seq_q.dtype == torch.int32 and key.dtype == query.dtype == value.dtype
        assert key.shape[1] == query.shape[1] or enable_gqa, "fewer KV heads need enable_gqa"
        bounds = cu_seq_q.tolist()
        assert bounds[0] == 0 and bounds[-1] == query.shape[0]
        assert max_q == max(b - a for a, b in zip(bounds, bounds[1:]))
        segments = []
        for start, end in zip(bounds, bounds[1:]):
            q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))  # [H, n, D]
            out = F.scaled_dot_product_attention(q, k, v, is_causal=tuple(window_size) == (-1, 0), scale=scale,
                                                 enable_gqa=enable_gqa)
            segments.append(out.transpose(0, 1))
        return torch.cat(segments)


@pytest.fixture
def reference_kernel(monkeypatch):
    kernel = ReferenceVarlen()
    monkeypatch.setattr(attention, "_torch_varlen_attn", kernel)
    return kernel


@pytest.fixture(scope="module")
def assembled(tiny_world):
    torch.manual_seed(0)
    assembled = build_llava(ModelConfig(llm=tiny_world.llm, vision_tower=tiny_world.clip,
                                        attn_implementation="sdpa"))
    apply_freeze(assembled.model, ["projector", "llm"])
    assert assembled.model.config.text_config.num_key_value_heads < assembled.model.config.text_config.num_attention_heads
    return assembled


@pytest.fixture(scope="module")
def samples(assembled, tiny_world, tmp_path_factory):
    shards = write_training_shards(tiny_world, tmp_path_factory.mktemp("attn"), samples=24, per_shard=24,
                                   stage="stage2")
    encoder = SampleEncoder(assembled.tokenizer, assembled.image_processor,
                            num_image_tokens=assembled.num_image_tokens, template="tokenizer",
                            insert_retrieved=True, max_tokens=320)
    encoded = [encoder(s) for s in iter_shard(shards / "train-000000.tar")]
    text_only = [e for e in encoded if e.pixel_values is None][:1]
    with_image = [e for e in encoded if e.pixel_values is not None][:3]
    return [with_image[0], text_only[0], with_image[1], with_image[2]]


def run(model, batch, implementation):
    model.set_attn_implementation(implementation)
    model.zero_grad(set_to_none=True)
    try:
        cfg = TGAConfig(layers=LAYERS)
        loss, parts = tga_forward(model, batch, CaptionTargets(cfg.layers, cached=False), 0.25, cfg)
        loss.backward()
    finally:
        model.set_attn_implementation("sdpa")
    return loss.detach(), parts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_step(flash, sdpa):
    (flash_loss, flash_parts, flash_grads), (sdpa_loss, sdpa_parts, sdpa_grads) = flash, sdpa
    torch.testing.assert_close(flash_loss, sdpa_loss, rtol=1e-5, atol=1e-5)
    for name in ("lm", "align", "pair", *(f"cos_layer/{layer}" for layer in LAYERS)):
        torch.testing.assert_close(torch.as_tensor(flash_parts[name]), torch.as_tensor(sdpa_parts[name]),
                                   rtol=1e-5, atol=1e-5, msg=name)
    assert sorted(flash_grads) == sorted(sdpa_grads)
    assert any(n.startswith("model.multi_modal_projector.") for n in flash_grads)
    for name, grad in sdpa_grads.items():
        torch.testing.assert_close(flash_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("single_row,captions_in_row", [(True, False), (True, True), (False, False)],
                         ids=["one-row", "one-row-captions-in-row", "first-fit-rows"])
def test_packed_rows_through_torch_varlen_train_like_sdpa_and_hand_the_kernel_the_batch_boundaries(
        assembled, samples, reference_kernel, single_row, captions_in_row):
    model, pad = assembled.model, assembled.tokenizer.pad_token_id
    batch = collate(samples, pad, packed=True, single_row=single_row, captions_in_row=captions_in_row)
    reference = run(model, collate(samples, pad), "sdpa")
    assert_same_training_step(run(model, batch, attention.TORCH_VARLEN), reference)
    layers = model.config.text_config.num_hidden_layers
    row_calls = [c for c in reference_kernel.calls if torch.equal(c["cu_seq_q"], batch.cu_seq_lens)]
    assert len(row_calls) == layers, "one kernel call per LLM layer with the batch's own boundaries"
    for call in row_calls:
        assert torch.equal(call["cu_seq_k"], batch.cu_seq_lens) and call["max_q"] == call["max_k"] == batch.max_length
    for call in reference_kernel.calls:
        assert call["window_size"] == (-1, 0) and call["enable_gqa"] and call["heads"] == (4, 2)
    # the rest is the separate caption forward (right-padded, unpadded into segments), up to the
    # deepest alignment layer; the vision tower never reaches the varlen kernel
    caption_calls = reference_kernel.calls[len(row_calls):]
    if captions_in_row:
        assert not caption_calls
    else:
        lengths = batch.caption_attention_mask.sum(1, dtype=torch.int32)
        assert len(caption_calls) == max(LAYERS)
        assert all(torch.equal(c["cu_seq_q"], F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))) for c in caption_calls)


def test_a_right_padded_batch_is_unpadded_into_segments_and_trains_like_sdpa(assembled, samples, reference_kernel):
    model, pad = assembled.model, assembled.tokenizer.pad_token_id
    batch = collate(samples, pad)
    assert not batch.attention_mask.all(), "the batch must have padding to drop"
    assert_same_training_step(run(model, batch, attention.TORCH_VARLEN), run(model, batch, "sdpa"))
    lengths = batch.attention_mask.sum(1, dtype=torch.int32)
    expected = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    layers = model.config.text_config.num_hidden_layers
    llm_calls = reference_kernel.calls[:layers]  # the multimodal forward, then the caption forward's
    assert all(torch.equal(c["cu_seq_q"], expected) and c["max_q"] == int(lengths.max()) for c in llm_calls)


def test_packed_rows_without_precomputed_boundaries_are_segmented_from_position_ids(assembled, samples,
                                                                                   reference_kernel):
    """A caller that passes only position_ids (as transformers' own packing collator does) still
    gets per-sample attention, never causal attention across the whole row."""
    model, pad = assembled.model, assembled.tokenizer.pad_token_id
    batch = collate(samples, pad, packed=True)
    outputs = {}
    for implementation in ("sdpa", attention.TORCH_VARLEN):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs[implementation] = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                            pixel_values=batch.pixel_values, use_cache=False).logits
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(outputs[attention.TORCH_VARLEN], outputs["sdpa"], rtol=1e-5, atol=1e-5)
    assert all(torch.equal(c["cu_seq_q"], batch.cu_seq_lens) for c in reference_kernel.calls)


def test_greedy_decoding_with_a_cache_matches_sdpa(assembled, samples, reference_kernel):
    model, tokenizer = assembled.model.eval(), assembled.tokenizer
    prompt = samples[1].text.input_ids[:20]  # a text-only sample's first tokens
    generated = {}
    try:
        for implementation in ("sdpa", attention.TORCH_VARLEN):
            model.set_attn_implementation(implementation)
            ids = torch.tensor([prompt, [tokenizer.pad_token_id] * 4 + prompt[4:]])  # second row left-padded
            mask = torch.ones_like(ids)
            mask[1, :4] = 0
            with torch.no_grad():
                generated[implementation] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                                           do_sample=False, pad_token_id=tokenizer.pad_token_id)
    finally:
        model.set_attn_implementation("sdpa")
        model.train()
    assert torch.equal(generated[attention.TORCH_VARLEN], generated["sdpa"])


def test_bf16_packed_step_keeps_bf16_into_the_kernel_and_stays_close_to_sdpa(tiny_world, samples, reference_kernel):
    """The dtype path GPUs take: bf16 weights and activations reach the kernel as bf16 (a float32
    upcast there would fail flash's dtype check on a GPU); the losses agree within bf16 precision."""
    torch.manual_seed(0)
    assembled = build_llava(ModelConfig(llm=tiny_world.llm, vision_tower=tiny_world.clip, dtype="bf16",
                                        attn_implementation="sdpa"))
    apply_freeze(assembled.model, ["projector", "llm"])
    model, pad = assembled.model, assembled.tokenizer.pad_token_id
    flash_loss, flash_parts, _ = run(model, collate(samples, pad, packed=True), attention.TORCH_VARLEN)
    sdpa_loss, sdpa_parts, _ = run(model, collate(samples, pad), "sdpa")
    assert {c["dtype"] for c in reference_kernel.calls} == {torch.bfloat16}
    torch.testing.assert_close(flash_loss.float(), sdpa_loss.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(torch.as_tensor(flash_parts["lm"]).float(), torch.as_tensor(sdpa_parts["lm"]).float(),
                               rtol=2e-2, atol=2e-2)


def test_auto_takes_torch_varlen_on_cuda_in_half_precision_without_the_flash_attn_package(monkeypatch):
    monkeypatch.setattr("pipeline.model.assemble._flash_attn_imports", lambda: False)
    assert resolve_attention("auto", "cuda", torch.bfloat16) == attention.TORCH_VARLEN
    assert resolve_attention("auto", "cuda", torch.float16) == attention.TORCH_VARLEN
    assert resolve_attention("auto", "cuda", torch.float32) == "sdpa"
    assert resolve_attention("auto", "cpu", torch.bfloat16) == "sdpa"
    assert packs_one_row(attention.TORCH_VARLEN) and packs_one_row("flash_attention_2") and not packs_one_row("sdpa")


def test_torch_varlen_on_a_torch_without_varlen_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(attention, "_torch_varlen_attn", None)
    monkeypatch.setattr("pipeline.model.assemble._flash_attn_imports", lambda: False)
    with pytest.raises(ValueError, match="torch >= 2.10.*use sdpa"):
        resolve_attention("torch_varlen", "cuda", torch.bfloat16)
    assert resolve_attention("auto", "cuda", torch.bfloat16) == "sdpa"


def test_an_older_varlen_signature_gets_is_causal_and_repeated_kv_heads(monkeypatch):
    """torch 2.10/2.11: `is_causal` instead of window_size, no enable_gqa."""
    seen = {}

    def old_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, is_causal=False):
        seen.update(is_causal=is_causal, kv_heads=key.shape[1])
        return query

    monkeypatch.setattr(attention, "_torch_varlen_attn", old_varlen)
    monkeypatch.setattr(attention, "_VARLEN_PARAMETERS", {"scale", "is_causal"})
    q, kv = torch.randn(5, 4, 8), torch.randn(5, 2, 8)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    attention.varlen_kernel(q, kv, kv, cu, cu, 3, 3, scale=None, causal=True)
    assert seen == {"is_causal": True, "kv_heads": 4}
