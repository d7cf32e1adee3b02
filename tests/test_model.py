"""The assembled Llava is transformers' own class; TGA's gradient reaches the projector only."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlavaForConditionalGeneration

from pipeline.data.batch import SampleEncoder, collate
from pipeline.data.shards import iter_shard
from pipeline.model.assemble import (ModelConfig, apply_freeze, build_llava, load_projector,
                                     projector_state_dict, resolve_attention, save_projector)
from pipeline.tga.loss import TGAConfig
from pipeline.train.step import CaptionTargets, tga_forward

LAYERS = [2, 3, 4]


@pytest.fixture(scope="module")
def assembled(tiny_world):
    torch.manual_seed(0)
    return build_llava(ModelConfig(llm=tiny_world.llm, vision_tower=tiny_world.clip))


@pytest.fixture(scope="module")
def batch(assembled, stage1_shards):
    encoder = SampleEncoder(assembled.tokenizer, assembled.image_processor,
                            num_image_tokens=assembled.num_image_tokens, template="tokenizer",
                            insert_retrieved=True, max_tokens=256)
    samples = [encoder(s) for s in list(iter_shard(stage1_shards / "train-000000.tar"))[:3]]
    return collate(samples, assembled.tokenizer.pad_token_id)


def projector_grads(model, batch, cfg, use_tga=True):
    model.zero_grad(set_to_none=True)
    if not use_tga:  # plain LLaVA: both TGA terms off
        cfg = dataclasses.replace(cfg, align_on=False, pair_on=False)
    loss, parts = tga_forward(model, batch, CaptionTargets(cfg.layers, cached=False), 0.0, cfg)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, parts, grads


def test_assembly_is_native_llava_with_clip_patch_features_and_sdpa(assembled):
    model = assembled.model
    assert type(model) is LlavaForConditionalGeneration
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    vision = model.config.vision_config
    assert assembled.num_image_tokens == (vision.image_size // vision.patch_size) ** 2
    assert model.config.text_config._attn_implementation == "sdpa"
    assert not any(p.device.type == "meta" for p in model.parameters())
    assert assembled.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


def test_alignment_gradient_reaches_only_the_projector(assembled, batch):
    model = assembled.model
    trainable = apply_freeze(model, ["projector"])
    assert trainable and all(n.startswith("model.multi_modal_projector.") for n in trainable)
    cfg = TGAConfig(layers=LAYERS)
    loss, parts, grads = projector_grads(model, batch, cfg)
    assert torch.isfinite(loss) and float(parts["n_valid"]) == 3
    assert set(grads) == set(trainable)
    _, _, lm_only = projector_grads(model, batch, cfg, use_tga=False)
    # The alignment terms change the projector's gradient (reference defect 1: math.exp gave none).
    assert any(not torch.allclose(grads[n], lm_only[n], atol=1e-7) for n in grads)


def test_detach_alignment_reproduces_the_lm_only_gradient(assembled, batch):
    model = assembled.model
    apply_freeze(model, ["projector"])
    cfg = TGAConfig(layers=LAYERS, detach_alignment=True)
    loss, parts, grads = projector_grads(model, batch, cfg)
    lm_loss, _, lm_only = projector_grads(model, batch, cfg, use_tga=False)
    assert loss.item() > lm_loss.item()        # the terms are in the loss value...
    for name in grads:                           # ...but add nothing to the gradient
        torch.testing.assert_close(grads[name], lm_only[name], rtol=0, atol=1e-7)


def test_stage1_caption_targets_are_computed_once_per_sample(assembled, batch):
    targets = CaptionTargets(LAYERS, cached=True, cache_size=100)
    first, valid = targets(assembled.model, batch)
    again, valid_again = targets(assembled.model, batch)
    assert targets.forwards == 1
    torch.testing.assert_close(first, again)
    assert first.shape[:2] == (len(LAYERS), 3) and valid.all() and valid_again.all()


def test_projector_round_trips_and_llava_naming_loads(assembled, tmp_path):
    model = assembled.model
    state = projector_state_dict({f"model.multi_modal_projector.{k}": v.clone()
                                  for k, v in model.model.multi_modal_projector.state_dict().items()})
    save_projector(state, tmp_path / "projector.safetensors")
    llava_names = {k.replace("multi_modal_projector.linear_1.", "model.mm_projector.0.")
                    .replace("multi_modal_projector.linear_2.", "model.mm_projector.2."): v + 1
                   for k, v in state.items()}
    save_file(llava_names, str(tmp_path / "mm_projector.safetensors"))
    load_projector(model, tmp_path / "mm_projector.safetensors")
    torch.testing.assert_close(model.model.multi_modal_projector.linear_1.bias,
                               state["multi_modal_projector.linear_1.bias"] + 1)
    load_projector(model, tmp_path / "projector.safetensors")
    torch.testing.assert_close(model.model.multi_modal_projector.linear_1.bias,
                               state["multi_modal_projector.linear_1.bias"])


def test_projector_of_another_model_is_refused_with_shapes(assembled, tmp_path):
    bad = {"multi_modal_projector.linear_1.weight": torch.zeros(7, 3),
           "multi_modal_projector.linear_1.bias": torch.zeros(7),
           "multi_modal_projector.linear_2.weight": torch.zeros(7, 7),
           "multi_modal_projector.linear_2.bias": torch.zeros(7)}
    save_projector(bad, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"other.safetensors: projector weight linear_1\.\w+ has shape \(7,.*model expects"):
        load_projector(assembled.model, tmp_path / "other.safetensors")


def test_unknown_trainable_part_is_refused(assembled):
    with pytest.raises(ValueError, match=r"unknown trainable part\(s\) \['vision'\]"):
        apply_freeze(assembled.model, ["vision"])


def test_training_forwards_keep_sdpa_and_never_compute_attention_maps(assembled, batch):
    # Reference defect 4: output_attentions=True forced eager attention and O(T^2) maps per layer.
    attention_maps = []
    attention = assembled.model.model.language_model.layers[0].self_attn
    handle = attention.register_forward_hook(lambda module, args, out: attention_maps.append(out[1]))
    try:
        tga_forward(assembled.model, batch, CaptionTargets(LAYERS, cached=False), 0.0, TGAConfig(layers=LAYERS))
    finally:
        handle.remove()
    assert len(attention_maps) == 2, "the multimodal forward and the caption forward"
    assert all(maps is None for maps in attention_maps)


def test_stage2_alignment_gradient_reaches_projector_and_llm_but_not_the_tower(assembled, batch):
    model = assembled.model
    apply_freeze(model, ["projector", "llm"])
    try:
        _, _, grads = projector_grads(model, batch, TGAConfig(layers=LAYERS))
        _, _, lm_only = projector_grads(model, batch, TGAConfig(layers=LAYERS), use_tga=False)
    finally:
        apply_freeze(model, ["projector"])
    assert not any(n.startswith("model.vision_tower.") for n in grads)
    layer = "model.language_model.layers.2.mlp.down_proj.weight"   # below the aligned layer 4
    assert layer in grads and grads[layer].abs().sum() > 0
    assert not torch.allclose(grads[layer], lm_only[layer])


def test_text_only_batch_still_runs_the_vision_tower_for_zero3(assembled, stage1_shards):
    # Under ZeRO-3 a rank that skipped the tower would leave the others waiting on its gather.
    encoder = SampleEncoder(assembled.tokenizer, assembled.image_processor,
                            num_image_tokens=assembled.num_image_tokens, template="tokenizer",
                            insert_retrieved=False, max_tokens=256)
    conversations = [{"from": "human", "value": "What colour is the sky?"},
                     {"from": "gpt", "value": "It is blue."}]
    sample = encoder(type("S", (), {"key": "t0", "image": None,
                                    "meta": {"conversations": conversations, "image_caption": ""}})())
    text_batch = collate([sample], assembled.tokenizer.pad_token_id)
    assert text_batch.pixel_values is None
    calls = []
    handle = assembled.model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        model = assembled.model
        apply_freeze(model, ["projector"])
        model.zero_grad(set_to_none=True)
        loss, parts = tga_forward(model, text_batch, CaptionTargets(LAYERS, cached=False), 0.0, TGAConfig(layers=LAYERS))
        loss.backward()
    finally:
        handle.remove()
    assert calls, "vision tower not run"
    assert torch.isfinite(loss) and float(parts["n_valid"]) == 0
    assert all(p.grad is not None and not p.grad.any()
               for p in model.model.multi_modal_projector.parameters()), "dummy image must add zero gradient"


@pytest.fixture(scope="module")
def checkpointed(tiny_world, assembled):
    """The fixture's weights with `model.gradient_checkpointing: true`, in train mode (as the loop runs it)."""
    other = build_llava(ModelConfig(llm=tiny_world.llm, vision_tower=tiny_world.clip, gradient_checkpointing=True))
    other.model.load_state_dict(assembled.model.state_dict())
    return other.model.train()


@pytest.mark.parametrize("trainable", [["projector"], ["projector", "llm"]], ids=["stage1", "stage2"])
def test_checkpointing_recomputes_the_decoder_only_and_changes_no_loss_or_gradient(
        assembled, checkpointed, batch, trainable):
    on = {type(m).__name__ for m in checkpointed.modules() if getattr(m, "gradient_checkpointing", False)}
    assert "LlamaDecoderLayer" in on and not any(name.startswith("CLIP") for name in on), on
    tower_needs_grad, layer_calls = [], []
    hooks = [checkpointed.model.vision_tower.register_forward_hook(
                 lambda module, args, out: tower_needs_grad.append(out.last_hidden_state.requires_grad)),
             # a sub-module's pre-hook: transformers checkpoints the layer's forward, not its __call__
             # with hooks, and the recompute stops early, after the last tensor the backward needs
             checkpointed.model.language_model.layers[0].mlp.register_forward_pre_hook(
                 lambda *args: layer_calls.append(1))]
    cfg = TGAConfig(layers=LAYERS)
    try:
        apply_freeze(assembled.model, trainable)
        apply_freeze(checkpointed, trainable)
        loss, parts, grads = projector_grads(assembled.model, batch, cfg)
        gc_loss, gc_parts, gc_grads = projector_grads(checkpointed, batch, cfg)
    finally:
        for hook in hooks:
            hook.remove()
        apply_freeze(assembled.model, ["projector"])
    # multimodal forward, no-grad caption forward, and the recompute in the backward
    assert len(layer_calls) == 3, "decoder layer 0 was not recomputed: checkpointing is off"
    assert tower_needs_grad == [False], "the frozen tower must stay out of the autograd graph"
    assert gc_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert gc_parts["align"].item() == pytest.approx(parts["align"].item(), rel=1e-6)
    assert set(gc_grads) == set(grads) and any(n.startswith("model.multi_modal_projector.") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(gc_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture()
def flash_attn_package(tmp_path, monkeypatch):
    """Put a `flash_attn` package on the path, either importable or broken the way a wheel built for
    another torch is (its import fails with an undefined symbol)."""
    def install(works: bool):
        package = tmp_path / ("ok" if works else "broken") / "flash_attn"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(
            "def flash_attn_func(*args, **kwargs):\n    raise RuntimeError('not a GPU')\n" if works else
            "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice')\n")
        monkeypatch.syspath_prepend(str(package.parent))
        monkeypatch.delitem(__import__("sys").modules, "flash_attn", raising=False)
    return install


def test_auto_attention_is_flash_only_on_cuda_in_half_precision_with_an_importable_flash_attn(flash_attn_package):
    flash_attn_package(works=True)
    assert resolve_attention("auto", "cuda", torch.bfloat16) == "flash_attention_2"
    assert resolve_attention("auto", "cuda", torch.float16) == "flash_attention_2"
    assert resolve_attention("auto", "cuda", torch.float32) == "sdpa"  # flash-attn rejects fp32
    assert resolve_attention("auto", "cpu", torch.bfloat16) == "sdpa"
    assert resolve_attention("eager", "cuda", torch.bfloat16) == "eager"  # an explicit choice stands


def test_a_flash_attn_that_does_not_import_falls_back_to_torchs_own_flash_kernels_with_a_warning(
        flash_attn_package, caplog):
    flash_attn_package(works=False)
    with caplog.at_level("WARNING"):
        assert resolve_attention("auto", "cuda", torch.bfloat16) == "torch_varlen"
    assert "undefined symbol" in caplog.text
