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

import contextlib

import torch
import torch.nn.functional as F

from pipeline.data.batch import Batch
from pipeline.tga.loss import TGAConfig, pool_caption_targets, tga_loss
from pipeline.tga.prompt import IGNORE_INDEX
from pipeline.train.distributed import any_rank

# Per-rank bound of the stage-1 cache: 9 layers x 4096 fp32 of a 7B LLM are 147 KB per sample.
CACHE_ENTRIES = 100_000
_UNSET = object()


class CaptionTargets:
    """Text-side targets t_b^l: pooled caption hidden states from a no-grad, eval-mode forward of
    the current weights. With a frozen LLM (stage 1) they never change: `cached` keeps them per
    sample key, up to `cache_size` entries (worth it only when a run meets a sample twice)."""

    def __init__(self, layers: list[int], cached: bool, cache_size: int = CACHE_ENTRIES):
        self.layers, self.cache_size = list(layers), cache_size if cached else 0
        # hidden_states[l] is the output of decoder layer l - 1: layers from max(l) on cannot change it
        self.depth = max(max(self.layers), 1)
        self.cache: dict[str, tuple[torch.Tensor, bool]] = {}
        self.forwards = 0

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cache_size:  # every rank runs the forward: nothing to agree on
            return self._forward(model, batch)
        keys = batch.keys
        # a rank whose samples are all cached still joins the forward when another rank's are not
        if any_rank(any(k not in self.cache for k in keys))[0]:
            targets, valid = self._forward(model, batch)
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
            # LlavaModel, not the LM head: only hidden states are needed (no logits, no attentions),
            # and only up to the deepest alignment layer (stage 1: 18 of 32 layers run, not 32).
            with decoder_depth(model.model.language_model, self.depth):
                out = model.model(input_ids=batch.caption_input_ids, attention_mask=batch.caption_attention_mask,
                                  output_hidden_states=True, use_cache=False)
        finally:
            model.train(was_training)
        return pool_caption_targets(out.hidden_states, batch.caption_spans, self.layers)


@contextlib.contextmanager
def decoder_depth(decoder: torch.nn.Module, depth: int):
    """Run only the first `depth` layers of a transformers decoder (LlamaModel, MistralModel, ...)
    in the forwards inside; its hidden_states[depth] stays the raw output of layer depth - 1.

    Why a shorter layer count: every decoder of transformers loops over
    `self.layers[: config.num_hidden_layers]`, so the forward stays transformers' own (masks,
    rotary embeddings, attention implementation); a decoder that ignored the count would run all
    layers, slower but with the same values. The alternatives break ZeRO-3: it gathers parameters
    in module hooks and prefetches along the module order it recorded for a whole step (from one
    top-level forward to the next, this forward included; partitioned_param_coordinator:
    trace_prologue, reset_step). Fewer layers at a fixed depth is one fixed order, so the trace
    stays valid and prefetching covers this forward; stopping by an exception would skip the
    enclosing modules' post-forward hooks (their parameters and ZeRO's module stack). `transformers`
    replaces the last hidden state by the final norm's output (tie_last_hidden_states): off here,
    because the last one is now a middle layer."""
    config = decoder.config
    layers = config.num_hidden_layers
    if depth >= layers:
        yield
        return
    tie = config.__dict__.get("tie_last_hidden_states", _UNSET)
    config.num_hidden_layers, config.tie_last_hidden_states = depth, False
    try:
        yield
    finally:
        config.num_hidden_layers = layers
        if tie is _UNSET:
            del config.tie_last_hidden_states
        else:
            config.tie_last_hidden_states = tie


def captions_in_row(choice: str, *, packed: bool, llm_trains: bool, model: torch.nn.Module) -> bool:
    """Whether the caption targets come from the packed rows (TrainConfig.caption_forward).

    In the row a caption input is a segment of its own (positions from 0, no label; varlen / the
    block-diagonal mask keep it apart), so its hidden states are the text-only forward's, but
    computed in training mode: equal only when nothing in the LLM drops out (the separate forward
    runs in eval mode). The trade: the separate forward gathers every ZeRO-3 layer up to the deepest
    alignment layer a second time per micro-step, while in the row the caption inputs (chat prefix +
    caption, ~60 tokens per sample with a Llama tokenizer) run through every layer forward and
    backward. "auto" takes the row when the LLM trains (stage 2: small micro-batches, where that
    gather is a large share of the step, and a backward that costs 6N per token either way) and the
    separate, shallower forward when it is frozen (stage 1: a 32-sample row, where the extra compute
    in the row outweighs the gather on one node; across nodes, set in_row)."""
    if choice == "separate" or (choice == "auto" and not (packed and llm_trains)):
        return False
    dropout = active_dropout(model.model.language_model)
    if choice == "auto":
        return not dropout
    if not packed:
        raise ValueError("caption_forward=in_row needs packed rows: set loader.packing=true")
    if dropout:
        raise ValueError(f"caption_forward=in_row would compute TGA's caption targets with dropout on "
                         f"({', '.join(dropout[:3])}): use caption_forward=separate (eval mode)")
    return True


def active_dropout(module: torch.nn.Module) -> list[str]:
    """What drops out in training mode: dropout modules with p > 0 (LoRA's included) and the
    configuration's attention/hidden dropout rates (applied functionally in transformers)."""
    found = [name for name, m in module.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    config = getattr(module, "config", None)
    rates = config.to_dict() if config is not None else {}
    found += [key for key, value in rates.items() if ("dropout" in key or key.endswith("pdrop"))
              and isinstance(value, float) and value > 0]
    return found


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
    kept, next_tokens = next_token_targets(batch.labels)
    try:
        # Packed batches carry position_ids and no attention_mask: transformers derives per-sample
        # attention from them (block-diagonal mask; flash varlen takes the collate's cu_seq_lens),
        # which needs use_cache=False.
        with varlen_arguments(model, batch), vision_feature_layer_only(model):
            out = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids, pixel_values=pixel_values,
                         logits_to_keep=kept, output_hidden_states=True, use_cache=False)
    finally:
        if hook is not None:
            hook.remove()
    # transformers' causal-LM loss (fp32 mean over labelled targets), on the kept logits [N, V]
    lm_loss = F.cross_entropy(out.logits.float(), next_tokens)
    if not cfg.enabled:
        return lm_loss, {"lm": lm_loss.detach()}
    if batch.caption_rows is not None:
        # the captions rode in the packed rows: their own segments, no label, pooled without gradient
        targets, valid = pool_caption_targets(out.hidden_states, batch.caption_spans, cfg.layers,
                                              batch.caption_rows)
    else:
        targets, valid = targets_fn(model, batch)
    return tga_loss(lm_loss, out.hidden_states, batch.image_spans, batch.retrieved_spans,
                    targets, valid, step_fraction, cfg, span_rows=batch.span_rows)


@contextlib.contextmanager
def varlen_arguments(model: torch.nn.Module, batch: Batch):
    """Hand a packed batch's segment boundaries to the language model's attention calls, and to
    nothing else: flash-attention's varlen kernels then take them as they are, where transformers
    would otherwise derive them from position_ids in every layer (~3 device syncs per layer).
    Llava forwards its extra keyword arguments to the vision tower as well, whose attention would
    take the LLM's lengths for its own [images, patches] batch: so they go in at the language model
    (a forward pre-hook), not through the engine's call. SDPA and eager attention ignore them (their
    block-diagonal mask comes from position_ids)."""
    if batch.cu_seq_lens is None:
        yield
        return
    lengths = {"cu_seq_lens_q": batch.cu_seq_lens, "cu_seq_lens_k": batch.cu_seq_lens,
               "max_length_q": batch.max_length, "max_length_k": batch.max_length}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: (args, {**kwargs, **lengths}), with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()


@contextlib.contextmanager
def vision_feature_layer_only(model: torch.nn.Module):
    """The vision tower keeps only the hidden state the projector reads (vision_feature_layer, -2),
    not all of them: the engine's `output_hidden_states=True` (TGA needs the LLM's) would otherwise
    reach the tower through Llava's get_image_features and keep every layer's output, 25 tensors
    of [images, 577, 1024] for CLIP-L/14-336. transformers captures just the layers it is given."""
    layer = model.config.vision_feature_layer
    hook = model.model.vision_tower.register_forward_pre_hook(
        lambda module, args, kwargs: (args, {**kwargs, "output_hidden_states": layer}), with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose *next* token is labelled ([R,T] bool, for `logits_to_keep`) and those
    tokens ([N]), in row-major order: transformers' shift (`ForCausalLMLoss`) without its full-vocab
    logits at every position. In stage 1 ~4% of the tokens are labelled, so the logits (upcast to
    fp32 for the loss) shrink ~25x. A packed sample's first label is ignored (collate), so no
    target crosses a sample boundary."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    keep = shifted != IGNORE_INDEX
    return keep, shifted[keep]


def _dummy_vision(model, device) -> torch.Tensor:
    vision = model.config.vision_config
    dtype = next(model.model.multi_modal_projector.parameters()).dtype
    pixels = torch.zeros(1, 3, vision.image_size, vision.image_size, device=device, dtype=dtype)
    features = model.model.get_image_features(pixel_values=pixels,
                                              vision_feature_layer=model.config.vision_feature_layer,
                                              vision_feature_select_strategy=model.config.vision_feature_select_strategy)
    return sum(f.sum() for f in features.pooler_output)
