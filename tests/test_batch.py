"""pipeline.data.batch: the one layout of a micro-batch, padded or packed (pure, hand-made samples)."""
from __future__ import annotations

import torch

from pipeline.data.batch import Batch, EncodedSample, collate
from pipeline.tga.prompt import IGNORE_INDEX, EncodedPrompt

PAD = 0


def _sample(key: str, length: int, *, image: tuple[int, int] | None = None, retrieved=None,
            caption: list[int] | None = None) -> EncodedSample:
    ids = [100 + i for i in range(length)]
    labels = [IGNORE_INDEX] * (length - 2) + ids[-2:]
    text = EncodedPrompt(ids, labels, image, retrieved, caption or [],
                         (1, len(caption)) if caption else None)
    pixels = torch.full((3, 2, 2), float(length)) if image is not None else None
    return EncodedSample(key, text, pixels)


def test_padded_batch_right_pads_and_marks_absent_spans_as_empty():
    samples = [_sample("a", 7, image=(1, 4), retrieved=(0, 1), caption=[5, 6, 7]), _sample("b", 4)]
    batch = collate(samples, PAD)
    assert isinstance(batch, Batch) and not batch.packed and len(batch) == 2
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape == (2, 7)
    assert batch.input_ids[1, 4:].eq(PAD).all() and batch.labels[1, 4:].eq(IGNORE_INDEX).all()
    assert batch.attention_mask.sum(1).tolist() == batch.seq_lens.tolist() == [7, 4]
    assert batch.labels[0].tolist() == samples[0].text.labels  # no label is dropped when padding
    assert batch.image_spans.tolist() == [[1, 4], [0, 0]]
    assert batch.retrieved_spans.tolist() == [[0, 1], [0, 0]]
    assert batch.span_rows.tolist() == [0, 1] and batch.position_ids is None
    assert batch.pixel_values.shape == (1, 3, 2, 2)
    # no caption: one attended pad token, so attention never sees a fully masked row
    assert batch.caption_input_ids.tolist() == [[5, 6, 7], [PAD, PAD, PAD]]
    assert batch.caption_attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.caption_spans.tolist() == [[1, 3], [0, 0]]


def test_packed_single_row_shifts_spans_restarts_positions_and_ignores_each_first_label():
    samples = [_sample("a", 3, image=(0, 2)), _sample("b", 5, image=(1, 3))]
    batch = collate(samples, PAD, packed=True)
    assert batch.packed and batch.input_ids.shape == (1, 8)
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert batch.image_spans.tolist() == [[0, 2], [4, 6]] and batch.span_rows.tolist() == [0, 0]
    assert batch.labels[0, 0] == IGNORE_INDEX and batch.labels[0, 3] == IGNORE_INDEX
    assert batch.seq_lens.tolist() == [3, 5]


def test_packed_rows_go_first_fit_decreasing_and_everything_per_sample_follows_the_placement():
    samples = [_sample("short", 2, image=(0, 1)), _sample("long", 6, image=(0, 1)),
               _sample("mid", 4, image=(0, 1))]
    batch = collate(samples, PAD, packed=True, single_row=False)
    # rows as long as the longest sample: [long], [mid, short]
    assert batch.keys == ["long", "mid", "short"] and batch.span_rows.tolist() == [0, 1, 1]
    assert batch.image_spans.tolist() == [[0, 1], [0, 1], [4, 5]]
    assert batch.seq_lens.tolist() == [6, 4, 2]
    # images in placement order: Llava fills image tokens row by row
    assert batch.pixel_values[:, 0, 0, 0].tolist() == [6.0, 4.0, 2.0]
    assert batch.input_ids.shape == (2, 6) and batch.position_ids[1].tolist() == [0, 1, 2, 3, 0, 1]


def test_to_moves_every_tensor_and_keeps_the_rest():
    batch = collate([_sample("a", 3)], PAD).to("meta")
    assert batch.input_ids.device.type == "meta" and batch.keys == ["a"] and batch.pixel_values is None


def test_moving_a_batch_keeps_its_span_and_length_metadata_on_the_host():
    """The TGA pooling reads spans as index lists: on a GPU each read of a device tensor is a sync.
    ("meta" stands in for the accelerator: what moves there leaves the host.)"""
    text = type("T", (), {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "image_span": None,
                          "retrieved_span": None, "caption_input_ids": [4, 5], "caption_span": (0, 2)})()
    for packed in (False, True):
        moved = collate([EncodedSample("a", text, pixel_values=None), EncodedSample("b", text, pixel_values=None)], 0,
                        packed=packed, captions_in_row=packed).to("meta")
        assert moved.input_ids.is_meta and moved.labels.is_meta
        assert (moved.cu_seq_lens.is_meta if packed else moved.attention_mask.is_meta)
        for name in ("seq_lens", "image_spans", "retrieved_spans", "span_rows", "caption_spans", "caption_lens"):
            assert getattr(moved, name).device.type == "cpu", name
