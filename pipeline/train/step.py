"""One TGA micro-step: the multimodal forward, the caption targets, the loss.

Under ZeRO-3 every forward and every backward gathers parameters collectively, so each rank must
run the same modules in the same order, both ways: the text-side forward runs on every rank when
any rank needs it, and a rank whose batch has no image still runs the vision tower and projector on
a dummy image, between the token embedding and the decoder as Llava does for images. Its features
join the token embeddings with weight 0 (values unchanged), so the backward also runs as on a rank
with images: through the decoder into the embeddings, then the projector. (Added to the loss
instead, a frozen-LLM rank without images would skip the decoder's backward that the others run.)
"""
from __future__ import annotations

import torch

from pipeline.data.batch import Batch
from pipeline.tga.loss import TGAConfig, pool_caption_targets, tga_loss
from pipeline.train.distributed import any_rank

# Per-rank bound of the stage-1 cache: 9 layers x 4096 fp32 of a 7B LLM are 147 KB per sample.
CACHE_ENTRIES = 100_000


class CaptionTargets:
    """Text-side targets t_b^l: pooled caption hidden states from a no-grad, eval-mode forward of
    the current weights. With a frozen LLM (`cached`: stage 1) they never change and are kept per
    sample key, up to `cache_size` entries."""

    def __init__(self, layers: list[int], cached: bool, cache_size: int = CACHE_ENTRIES):
        self.layers, self.cache_size = list(layers), cache_size if cached else 0
        self.cache: dict[str, tuple[torch.Tensor, bool]] = {}
        self.forwards = 0

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        keys = batch.keys
        missing = any(k not in self.cache for k in keys) or not self.cache_size
        if any_rank(missing)[0]:
            targets, valid = self._forward(model, batch)
            if self.cache_size:
                for i, key in enumerate(keys):
                    if len(self.cache) < self.cache_size:
                        self.cache[key] = (targets[:, i].cpu(), bool(valid[i]))
            return targets, valid
        device = batch.input_ids.device
        targets = torch.stack([self.cache[k][0] for k in keys], dim=1).to(device)
        valid = torch.tensor([self.cache[k][1] for k in keys], device=device)
        return targets, valid

    @torch.no_grad()
    def _forward(self, model: torch.nn.Module, batch: Batch):
        self.forwards += 1
        was_training = model.training
        model.eval()
        try:
            # LlavaModel, not the LM head: only hidden states are needed (no logits, no attentions).
            out = model.model(input_ids=batch.caption_input_ids, attention_mask=batch.caption_attention_mask,
                              output_hidden_states=True)
        finally:
            model.train(was_training)
        return pool_caption_targets(out.hidden_states, batch.caption_spans, self.layers)


def tga_forward(engine, batch: Batch, targets_fn: CaptionTargets, step_fraction: float,
                cfg: TGAConfig) -> tuple[torch.Tensor, dict]:
    """`engine`: a DeepSpeed engine or the bare Llava model (tests, analysis)."""
    model = getattr(engine, "module", engine)
    pixel_values = batch.pixel_values
    hook = None
    if pixel_values is None:
        # A batch without images still runs tower + projector, at the point Llava runs them for
        # images: right after the token embedding, inside the engine's forward. ZeRO-3 gathers
        # parameters module by module in collectives (and starts each forward with one), so every
        # rank must visit the modules in the same order or the ranks wait on each other for ever.
        hook = model.get_input_embeddings().register_forward_hook(
            lambda module, args, output: output + 0.0 * _dummy_vision(model, output.device))
    try:
        # Packed batches carry position_ids and no attention_mask: transformers derives per-sample
        # attention from them (flash varlen / block-diagonal mask), which needs use_cache=False.
        out = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, pixel_values=pixel_values,
                     labels=batch.labels, output_hidden_states=True, use_cache=False)
    finally:
        if hook is not None:
            hook.remove()
    lm_loss = out.loss
    if not cfg.enabled:
        return lm_loss, {"lm": lm_loss.detach()}
    targets, valid = targets_fn(model, batch)
    return tga_loss(lm_loss, out.hidden_states, batch.image_spans, batch.retrieved_spans,
                    targets, valid, step_fraction, cfg, span_rows=batch.span_rows)


def _dummy_vision(model, device) -> torch.Tensor:
    vision = model.config.vision_config
    dtype = next(model.model.multi_modal_projector.parameters()).dtype
    pixels = torch.zeros(1, 3, vision.image_size, vision.image_size, device=device, dtype=dtype)
    features = model.model.get_image_features(pixel_values=pixels,
                                              vision_feature_layer=model.config.vision_feature_layer,
                                              vision_feature_select_strategy=model.config.vision_feature_select_strategy)
    return sum(f.sum() for f in features.pooler_output)
