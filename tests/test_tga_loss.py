"""The TGA loss matches the paper's formula, sends gradient through the alignment terms, and never
turns empty spans into NaN (defects 1 and 3 of the reference code)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError, load_config
from pipeline.tga.loss import TGAConfig, pool_caption_targets, span_means, tga_loss

B, T, D, N_HIDDEN = 5, 12, 16, 6
LAYERS = [2, 3, 5]


def _spans(*pairs):
    return torch.tensor(pairs, dtype=torch.long)


# sample 2: empty image span; sample 3: no caption target; sample 4: no retrieved text
IMAGE_SPANS = _spans((2, 7), (1, 9), (0, 0), (3, 6), (4, 12))
RETRIEVED_SPANS = _spans((0, 2), (9, 11), (0, 3), (0, 3), (0, 0))
CAPTION_VALID = torch.tensor([True, True, True, False, True])


class TinyVLM(nn.Module):
    """A projector (the trainable part in stage 1) feeding fixed 'decoder layers' and an LM head."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.projector = nn.Linear(8, D).to(dtype)
        with torch.no_grad():  # same weights in every instance, so gradients can be compared
            self.projector.weight.copy_(torch.randn(D, 8, generator=gen) / math.sqrt(8))
            self.projector.bias.copy_(torch.randn(D, generator=gen) * 0.1)
        self.register_buffer("mix", torch.randn(N_HIDDEN, D, D, generator=gen).to(dtype) / math.sqrt(D))
        self.register_buffer("head", torch.randn(D, 11, generator=gen).to(dtype))

    def forward(self, features, tokens):
        hidden = [self.projector(features)]
        for layer in range(1, N_HIDDEN):
            hidden.append(torch.tanh(hidden[-1] @ self.mix[layer]) + hidden[-1])
        logits = (hidden[-1] @ self.head).float()
        lm_loss = nn.functional.cross_entropy(logits.reshape(-1, 11), tokens.reshape(-1))
        return lm_loss, tuple(hidden)


def _batch(dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(B, T, 8, generator=gen).to(dtype)
    tokens = torch.randint(0, 11, (B, T), generator=gen)
    targets = torch.randn(len(LAYERS), B, D, generator=gen)
    return features, tokens, targets


def _cos(a, b):
    return torch.dot(a, b) / (a.norm() * b.norm())


def _hand_rolled(lm_loss, hidden, targets, step_fraction, cfg):
    """The formula of docs/method.md, one sample and one layer at a time."""
    aligns, pairs, cos_layer = [], [], {}
    for li, layer in enumerate(cfg.layers):
        cosines = []
        for b in range(B):
            (i0, i1), (r0, r1) = IMAGE_SPANS[b].tolist(), RETRIEVED_SPANS[b].tolist()
            if i1 <= i0 or not CAPTION_VALID[b]:
                continue
            t = targets[li, b].float()
            cos_it = _cos(hidden[layer][b, i0:i1].float().mean(0), t)
            cosines.append(cos_it)
            aligns.append(torch.exp(-cos_it))
            if r1 > r0:
                cos_rt = _cos(hidden[layer][b, r0:r1].float().mean(0), t)
                pairs.append(torch.exp(cos_rt - cos_it))
        cos_layer[layer] = torch.stack(cosines).mean()
    align, pair = torch.stack(aligns).mean(), torch.stack(pairs).mean()
    decay = 1 - step_fraction
    total = lm_loss + cfg.align_weight * decay * align + cfg.pair_weight * decay ** 2 * pair
    return total, align, pair, cos_layer, len(aligns) // len(LAYERS), len(pairs) // len(LAYERS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_parts_equal_a_hand_rolled_loop_over_samples_and_layers(dtype):
    cfg = TGAConfig(layers=LAYERS)
    features, tokens, targets = _batch(dtype)
    lm_loss, hidden = TinyVLM(dtype)(features, tokens)
    total, parts = tga_loss(lm_loss, hidden, IMAGE_SPANS, RETRIEVED_SPANS, targets, CAPTION_VALID, 0.3, cfg)
    ref_total, ref_align, ref_pair, ref_cos, n_valid, n_pair = _hand_rolled(lm_loss, hidden, targets, 0.3, cfg)

    assert total.dtype == torch.float32
    torch.testing.assert_close(total, ref_total.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts["align"], ref_align, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts["pair"], ref_pair, rtol=1e-5, atol=1e-5)
    for layer in LAYERS:
        torch.testing.assert_close(parts[f"cos_layer/{layer}"], ref_cos[layer], rtol=1e-5, atol=1e-5)
    assert (int(parts["n_valid"]), int(parts["n_pair_valid"])) == (n_valid, n_pair) == (3, 2)
    assert parts["align_weight"] == pytest.approx(0.25 * 0.7)
    assert parts["pair_weight"] == pytest.approx(0.10 * 0.49)
    assert not any(isinstance(v, torch.Tensor) and v.requires_grad for v in parts.values())


def _projector_grad(cfg, step_fraction=0.2, with_alignment=True):
    model = TinyVLM(torch.float32)
    features, tokens, targets = _batch()
    lm_loss, hidden = model(features, tokens)
    if with_alignment:
        total, _ = tga_loss(lm_loss, hidden, IMAGE_SPANS, RETRIEVED_SPANS, targets, CAPTION_VALID,
                            step_fraction, cfg)
    else:
        total = lm_loss
    total.backward()
    return model.projector.weight.grad.clone(), total.detach()


def test_alignment_terms_send_gradient_to_the_projector():
    lm_only, _ = _projector_grad(TGAConfig(layers=LAYERS), with_alignment=False)
    align_only, _ = _projector_grad(TGAConfig(layers=LAYERS, pair_on=False))
    both, _ = _projector_grad(TGAConfig(layers=LAYERS))
    assert (align_only - lm_only).abs().max() > 1e-4
    assert (both - align_only).abs().max() > 1e-6  # the pair term adds its own gradient


def test_alignment_gradient_equals_autograd_of_the_hand_rolled_formula():
    cfg = TGAConfig(layers=LAYERS)
    ours, _ = _projector_grad(cfg)
    model = TinyVLM(torch.float32)
    features, tokens, targets = _batch()
    lm_loss, hidden = model(features, tokens)
    _hand_rolled(lm_loss, hidden, targets, 0.2, cfg)[0].backward()
    torch.testing.assert_close(ours, model.projector.weight.grad, rtol=1e-5, atol=1e-6)


def test_detach_alignment_reproduces_the_released_code_lm_only_gradient_with_the_same_loss_value():
    lm_only, _ = _projector_grad(TGAConfig(layers=LAYERS), with_alignment=False)
    detached, detached_value = _projector_grad(TGAConfig(layers=LAYERS, detach_alignment=True))
    _, live_value = _projector_grad(TGAConfig(layers=LAYERS))
    torch.testing.assert_close(detached, lm_only, rtol=0, atol=0)
    torch.testing.assert_close(detached_value, live_value)


def test_alignment_terms_go_through_torch_exp_in_the_autograd_graph():
    features, tokens, targets = _batch()
    lm_loss, hidden = TinyVLM(torch.float32)(features, tokens)
    total, _ = tga_loss(lm_loss, hidden, IMAGE_SPANS, RETRIEVED_SPANS, targets, CAPTION_VALID, 0.0,
                        TGAConfig(layers=LAYERS))
    seen, stack = set(), [total.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    assert "ExpBackward0" in {type(node).__name__ for node in seen}


def test_invalid_samples_do_not_change_the_loss():
    features, tokens, targets = _batch()
    lm_loss, hidden = TinyVLM(torch.float32)(features, tokens)
    cfg = TGAConfig(layers=LAYERS)
    _, parts = tga_loss(lm_loss, hidden, IMAGE_SPANS, RETRIEVED_SPANS, targets, CAPTION_VALID, 0.0, cfg)
    # garbage (NaN) in the hidden states and targets of invalid samples changes nothing
    poisoned = [h.detach().clone() for h in hidden]
    for h in poisoned:
        h[2] = float("nan")
        h[3] = float("nan")
    bad_targets = targets.clone()
    bad_targets[:, 2:4] = float("nan")
    _, poisoned_parts = tga_loss(lm_loss, tuple(poisoned), IMAGE_SPANS, RETRIEVED_SPANS, bad_targets,
                                 CAPTION_VALID, 0.0, cfg)
    for key in ("align", "pair", *[f"cos_layer/{layer}" for layer in LAYERS]):
        torch.testing.assert_close(poisoned_parts[key], parts[key])


def test_all_invalid_micro_batch_gives_exactly_the_lm_loss_and_a_finite_connected_gradient():
    model = TinyVLM(torch.float32)
    features, tokens, targets = _batch()
    lm_loss, hidden = model(features, tokens)
    # padding garbage outside every span must not leak either
    poisoned = tuple(torch.where(torch.arange(T)[None, :, None] >= 10, float("nan"), h) for h in hidden)
    empty = torch.zeros(B, 2, dtype=torch.long)
    total, parts = tga_loss(lm_loss, poisoned, empty, RETRIEVED_SPANS, targets,
                            torch.ones(B, dtype=torch.bool), 0.0, TGAConfig(layers=LAYERS))
    assert total.item() == lm_loss.item()
    assert parts["align"].item() == 0.0 and parts["pair"].item() == 0.0 and int(parts["n_valid"]) == 0
    assert all(parts[f"cos_layer/{layer}"].item() == 0.0 for layer in LAYERS)
    total.backward()
    assert torch.isfinite(model.projector.weight.grad).all()


def test_no_caption_targets_at_all_is_also_exactly_the_lm_loss():
    features, tokens, targets = _batch()
    lm_loss, hidden = TinyVLM(torch.float32)(features, tokens)
    total, parts = tga_loss(lm_loss, hidden, IMAGE_SPANS, RETRIEVED_SPANS, torch.full_like(targets, float("nan")),
                            torch.zeros(B, dtype=torch.bool), 0.5, TGAConfig(layers=LAYERS))
    assert total.item() == lm_loss.item() and torch.isfinite(total)


@pytest.mark.parametrize("step_fraction, align, pair", [(0.0, 0.25, 0.10), (0.5, 0.125, 0.025), (1.0, 0.0, 0.0)])
def test_linear_decay_schedule_weights(step_fraction, align, pair):
    assert TGAConfig().term_weights(step_fraction) == pytest.approx((align, pair))


@pytest.mark.parametrize("step_fraction", [0.0, 0.5, 1.0])
def test_constant_schedule_keeps_full_weights(step_fraction):
    assert TGAConfig(schedule="constant").term_weights(step_fraction) == pytest.approx((0.25, 0.10))


def test_switched_off_terms_have_zero_weight_and_leave_the_loss():
    assert TGAConfig(align_on=False).term_weights(0.0) == (0.0, pytest.approx(0.10))
    assert TGAConfig(pair_on=False).term_weights(0.0) == (pytest.approx(0.25), 0.0)
    features, tokens, targets = _batch()
    lm_loss, hidden = TinyVLM(torch.float32)(features, tokens)
    total, parts = tga_loss(lm_loss, hidden, IMAGE_SPANS, RETRIEVED_SPANS, targets, CAPTION_VALID, 0.0,
                            TGAConfig(layers=LAYERS, align_on=False, pair_on=False))
    assert total.item() == lm_loss.item()
    assert parts["align"].item() > 0  # still measured for logging


def test_step_fraction_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match="step_fraction"):
        TGAConfig().term_weights(1.5)


def test_span_means_are_fp32_flag_empty_spans_and_ignore_nan_outside_the_span():
    hidden = torch.randn(3, 6, 4).to(torch.bfloat16)
    hidden[0, 4:] = float("nan")
    pooled, valid = span_means((hidden,), _spans((1, 4), (0, 0), (0, 6)), [0])
    assert pooled.shape == (1, 3, 4) and pooled.dtype == torch.float32
    assert valid.tolist() == [True, False, True]
    torch.testing.assert_close(pooled[0, 0], hidden[0, 1:4].float().mean(0))
    assert pooled[0, 1].abs().sum() == 0 and torch.isfinite(pooled).all()


def test_span_means_of_packed_rows_read_each_sample_in_its_row():
    hidden = torch.randn(2, 6, 4)
    pooled, _ = span_means((hidden,), _spans((0, 2), (3, 6), (1, 5)), [0], span_rows=torch.tensor([0, 0, 1]))
    torch.testing.assert_close(pooled[0], torch.stack([hidden[0, 0:2].mean(0), hidden[0, 3:6].mean(0),
                                                       hidden[1, 1:5].mean(0)]))


def test_spans_outside_the_sequence_are_refused():
    with pytest.raises(ValueError, match="out of range"):
        span_means((torch.zeros(1, 4, 2),), _spans((2, 5)), [0])


def test_pool_caption_targets_pools_each_layer_without_gradient():
    model = TinyVLM(torch.float32)
    features, tokens, _ = _batch()
    _, hidden = model(features, tokens)
    spans = _spans((1, 3), (0, 0), (2, 12), (5, 6), (0, 4))
    targets, valid = pool_caption_targets(hidden, spans, LAYERS)
    assert targets.shape == (len(LAYERS), B, D) and targets.dtype == torch.float32
    assert not targets.requires_grad and valid.tolist() == [True, False, True, True, True]
    torch.testing.assert_close(targets[1, 2], hidden[LAYERS[1]][2, 2:12].mean(0))
    with pytest.raises(ValueError, match="exceed"):
        pool_caption_targets(hidden, spans, [N_HIDDEN])


def test_config_is_a_section_the_stage_config_loader_can_build_and_validate():
    cfg = load_config(TGAConfig, None, ["layers=[4,5]", "schedule=constant", "detach_alignment=true"])
    assert cfg == TGAConfig(layers=[4, 5], schedule="constant", detach_alignment=True)
    assert TGAConfig().layers == list(range(10, 19))
    with pytest.raises(ConfigError, match="distinct"):
        load_config(TGAConfig, None, ["layers=[4,4]"])
    with pytest.raises(ConfigError, match="schedule"):
        load_config(TGAConfig, None, ["schedule=cosine"])
