"""The TGA objective (Xu et al., ICLR 2025), differentiable and NaN-proof.

    L = CE + w_a f_a(s) mean_{l,b} exp(-cos(i_b^l, t_b^l))
           + w_p f_p(s) mean_{l,b} exp(cos(r_b^l, t_b^l) - cos(i_b^l, t_b^l))

i, r: mean hidden state of layer l over the image / retrieved-text span of the multimodal forward;
t: the same over the caption tokens of the no-grad text-only forward; s = optimizer_step / total;
f_a = 1 - s, f_p = (1 - s)^2 for `linear_decay`, 1 for `constant`.

Where the reference code went wrong, and what stands here instead:
- it applied Python `math.exp`, so the terms were floats with no gradient: here `torch.exp`, and
  `detach_alignment` reproduces the released behaviour on purpose (value logged, no gradient);
- its pooled spans could be empty and made NaN: here empty spans are masked out, all-invalid batches
  give an exact 0 that is still part of the graph, and no NaN can reach the backward pass.
The loss reads the per-layer hidden states as the model returns them (stacking 9 layers of a 7B
batch would copy ~1.7 GB); pooling gathers span positions (no boolean indexing, no masked copies),
and the only host sync is the span range check.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

COS_EPS = 1e-8  # cosine epsilon shared by the loss and the alignment tool


@dataclass(frozen=True)
class TGAConfig:
    # hidden_states indices (0 = embeddings); the reference's safety band of a 32-layer LLM
    layers: list[int] = field(default_factory=lambda: list(range(10, 19)))
    align_weight: float = 0.25
    pair_weight: float = 0.10
    align_on: bool = True
    pair_on: bool = True
    detach_alignment: bool = False  # True = the released code: terms in the loss value, no gradient
    schedule: Literal["linear_decay", "constant"] = "linear_decay"

    def __post_init__(self):
        if not self.layers:
            raise ValueError("layers: give at least one hidden_states index")
        if any(layer < 0 for layer in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be distinct hidden_states indices >= 0, got {self.layers}")
        if self.align_weight < 0 or self.pair_weight < 0:
            raise ValueError(f"weights must be >= 0, got align_weight={self.align_weight}, "
                             f"pair_weight={self.pair_weight}")

    @property
    def enabled(self) -> bool:
        """Whether TGA adds anything to the LM loss (both terms off: plain LLaVA training)."""
        return self.align_on or self.pair_on

    def term_weights(self, step_fraction: float) -> tuple[float, float]:
        """(alignment, pair) weights at training progress s, zero for a term that is off."""
        if not 0.0 <= step_fraction <= 1.0:
            raise ValueError(f"step_fraction must be in [0, 1], got {step_fraction}")
        decay = 1.0 - step_fraction if self.schedule == "linear_decay" else 1.0
        align = self.align_weight * decay if self.align_on else 0.0
        pair = self.pair_weight * decay ** 2 if self.pair_on else 0.0
        return align, pair


def span_means(hidden_states: Sequence[torch.Tensor], spans: torch.Tensor, layers: list[int],
               span_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over each sample's span at each layer: ([L,B,D] fp32, nonempty [B]).

    `hidden_states`: the model's tuple (index 0 = embeddings), each [R,T,D]; spans [B,2] half-open,
    (0, 0) for none; `span_rows` [B] the row of each sample (packed batches), default row b."""
    _check_layers(layers, len(hidden_states))
    rows, length, _ = hidden_states[0].shape
    pool = SpanPool(spans, span_rows, rows, length, hidden_states[0].device)
    return torch.stack([pool(hidden_states[layer]) for layer in layers]), pool.nonempty


def pool_caption_targets(hidden_states: Sequence[torch.Tensor], caption_spans: torch.Tensor,
                         layers: list[int], span_rows: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """t_b^l from the text-only forward's `hidden_states` tuple, or from the caption segments of a
    packed multimodal forward (`span_rows`): ([L,B,D] fp32, valid [B]), never with a gradient."""
    with torch.no_grad():
        return span_means(hidden_states, caption_spans, layers, span_rows)


def tga_loss(lm_loss: torch.Tensor, hidden_states: Sequence[torch.Tensor], image_spans: torch.Tensor,
             retrieved_spans: torch.Tensor, caption_targets: torch.Tensor, caption_valid: torch.Tensor,
             step_fraction: float, cfg: TGAConfig, span_rows: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """Total loss and its detached parts for logging.

    hidden_states: the multimodal forward's tuple (index = layer, 0 = embeddings), each [R,T,D];
    spans [B,2] are half-open token ranges, (0, 0) for none, in row `span_rows[b]` (packed rows,
    pipeline.data.batch; default row b); caption_targets [L,B,D] and caption_valid [B] come from
    `pool_caption_targets`. A sample counts for the alignment term when it has an image span and a
    caption target, and for the pair term when it also has a retrieved span. Means run over valid
    (layer, sample) pairs; with none valid a term is exactly 0. Parts: lm, align, pair (unweighted
    means), align_weight, pair_weight (effective), n_valid, n_pair_valid and cos_layer/<l> (mean
    cos(i, t) over valid samples, 0 when none: combine across ranks weighted by n_valid).
    """
    _check_layers(cfg.layers, len(hidden_states))
    if caption_targets.shape[0] != len(cfg.layers):
        raise ValueError(f"caption_targets has {caption_targets.shape[0]} layers, cfg.layers has "
                         f"{len(cfg.layers)}")
    rows, length, _ = hidden_states[0].shape
    device = hidden_states[0].device
    image_pool = SpanPool(image_spans, span_rows, rows, length, device)  # once for all layers
    retrieved_pool = SpanPool(retrieved_spans, span_rows, rows, length, device)
    valid = image_pool.nonempty & caption_valid.to(device=device, dtype=torch.bool)
    pair_valid = valid & retrieved_pool.nonempty
    n_valid, n_pair_valid = valid.sum(), pair_valid.sum()

    exp_align, exp_pair, parts = [], [], {}
    for index, layer in enumerate(cfg.layers):
        # rows of samples that do not count are zeroed before any arithmetic: a masked-out NaN
        # would still turn into NaN gradients through the cosine (0 * NaN)
        image = torch.where(valid[:, None], image_pool(hidden_states[layer]), 0.0)
        retrieved = torch.where(pair_valid[:, None], retrieved_pool(hidden_states[layer]), 0.0)
        target = torch.where(valid[:, None], caption_targets[index].detach().float(), 0.0)  # no-grad
        cos_image = F.cosine_similarity(image, target, dim=-1, eps=COS_EPS)  # [B]
        cos_retrieved = F.cosine_similarity(retrieved, target, dim=-1, eps=COS_EPS)
        exp_align.append(torch.where(valid, torch.exp(-cos_image), 0.0))
        exp_pair.append(torch.where(pair_valid, torch.exp(cos_retrieved - cos_image), 0.0))
        parts[f"cos_layer/{layer}"] = (torch.where(valid, cos_image, 0.0).sum()
                                       / n_valid.clamp(min=1)).detach()

    # sums over masked terms: exactly 0, and still in the graph, when nothing is valid
    align = torch.stack(exp_align).sum() / (n_valid * len(cfg.layers)).clamp(min=1)
    pair = torch.stack(exp_pair).sum() / (n_pair_valid * len(cfg.layers)).clamp(min=1)
    if cfg.detach_alignment:
        align, pair = align.detach(), pair.detach()
    align_w, pair_w = cfg.term_weights(step_fraction)
    total = lm_loss.float()
    if align_w:
        total = total + align_w * align
    if pair_w:
        total = total + pair_w * pair
    parts.update(lm=lm_loss.detach().float(), align=align.detach(), pair=pair.detach(),
                 align_weight=align_w, pair_weight=pair_w, n_valid=n_valid, n_pair_valid=n_pair_valid)
    return total, parts


class SpanPool:
    """Mean over each sample's span of a [R,T,D] hidden state, as [B,D] fp32; rows without a span
    are zeros (`nonempty` False).

    Span positions are gathered (index_select), never multiplied by a mask: no copy of the whole
    hidden state, and a NaN outside a span cannot leak in. The indices are built once per batch and
    reused for every layer; the range check is the one host sync.
    """

    def __init__(self, spans: torch.Tensor, span_rows: torch.Tensor | None, rows: int, length: int,
                 device: torch.device):
        batch = len(spans)
        if spans.dim() != 2 or spans.shape[1] != 2:
            raise ValueError(f"spans must be [B,2] (start, end), got {list(spans.shape)}")
        if span_rows is None:
            if rows != batch:
                raise ValueError(f"hidden states have {rows} rows for {batch} samples: packed batches "
                                 "need span_rows")
            span_rows = torch.arange(batch)
        bounds = spans.tolist()
        row_ids = span_rows.tolist()
        if len(row_ids) != batch or any(not 0 <= r < rows for r in row_ids):
            raise ValueError(f"span_rows must give a row in [0, {rows}) per sample, got {row_ids}")
        # a span past the sequence end would silently pool fewer tokens: that is a batching bug
        if any(not 0 <= start <= length or not 0 <= end <= length for start, end in bounds):
            raise ValueError(f"spans out of range [0, {length}]: {bounds}")
        lengths = [max(end - start, 0) for start, end in bounds]
        flat = [row * length + p for (start, end), row in zip(bounds, row_ids) for p in range(start, end)]
        self.batch = batch
        self.index = torch.tensor(flat, dtype=torch.long, device=device)
        self.segment = torch.repeat_interleave(torch.arange(batch, device=device),
                                               torch.tensor(lengths, device=device), output_size=len(flat))
        self.count = torch.tensor(lengths, dtype=torch.float32, device=device).clamp(min=1)[:, None]
        self.nonempty = torch.tensor(lengths, device=device) > 0

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        gathered = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.index).float()
        summed = torch.zeros(self.batch, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
        return summed.index_add(0, self.segment, gathered) / self.count


def _check_layers(layers: list[int], available: int) -> None:
    if max(layers) >= available:
        raise ValueError(f"alignment layers {layers} exceed the model's {available} hidden states "
                         f"(indices 0..{available - 1}; 0 is the embedding output)")
