"""Shard sample → model inputs → the micro-batch, one typed `Batch`, right-padded or packed.

`SampleEncoder` runs inside data-loader workers, one sample at a time: image pixels (LLaVA-1.5
pad-to-square) and the TGA prompt (pipeline.tga.prompt). `collate` makes the batch: everything
downstream (the TGA step, the metrics, the FLOP counter) reads a `Batch`'s attributes, and this is
the only module that lays one out. Samples are *placed* into rows (one per sample when
padded; first-fit when packed), and every per-sample field — keys, spans, caption inputs, images —
follows that placement order, which is the order Llava fills image tokens with image features.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any

import torch
from PIL import Image

from pipeline.tga.prompt import IGNORE_INDEX, Rejected, Span, build_sample


@dataclasses.dataclass
class Encoded:
    key: str
    text: Any                      # pipeline.tga.prompt.EncodedSample
    pixel_values: torch.Tensor | None
    dataset: str = ""              # the data set (mixture entry) it was drawn from


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


class SampleEncoder:
    def __init__(self, tokenizer, image_processor, *, num_image_tokens: int, template: str,
                 insert_retrieved: bool, max_tokens: int,
                 pad_to_square: bool = True):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.num_image_tokens, self.template = num_image_tokens, template
        self.insert_retrieved, self.max_tokens = insert_retrieved, max_tokens
        self.pad_to_square = pad_to_square
        mean = getattr(image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
        self.fill = tuple(int(255 * m) for m in mean)

    def pixels(self, image_bytes: bytes) -> torch.Tensor:
        image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
        if self.pad_to_square:
            image = expand_to_square(image, self.fill)
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __call__(self, sample) -> Encoded | Rejected:
        meta = sample.meta
        retrieved = meta.get("retrieved") or []
        # Toxic samples keep their CE loss but get no alignment target (as the reference intends):
        # TGA aligns images to benign descriptions, never pulls toward toxic text.
        caption = None if meta.get("toxic") else (meta.get("image_caption") or None)
        text = build_sample(
            self.tokenizer, meta["conversations"], template=self.template,
            image_caption=caption,
            retrieved_text=retrieved[0]["text"] if retrieved and sample.image is not None else None,
            insert_retrieved=self.insert_retrieved, num_image_tokens=self.num_image_tokens,
            max_tokens=self.max_tokens)
        if isinstance(text, Rejected):
            return text
        # the join wrote image bytes exactly for the records whose first turn holds the placeholder
        try:
            pixels = self.pixels(sample.image) if sample.image is not None else None
        except (OSError, ValueError) as err:
            return Rejected("undecodable_image", f"{type(err).__name__}: {err}")
        return Encoded(sample.key, text, pixels, getattr(sample, "dataset", ""))


@dataclasses.dataclass
class Batch:
    keys: list[str]                     # [B] sample keys, in placement order
    input_ids: torch.Tensor             # [R, T] R rows: B when padded, fewer when packed
    labels: torch.Tensor                # [R, T] IGNORE_INDEX except answer tokens
    attention_mask: torch.Tensor | None  # [R, T]; None when packed (attention follows position_ids)
    position_ids: torch.Tensor | None   # [R, T] restarting per sample; packed only
    seq_lens: torch.Tensor              # [B] tokens of each sample
    image_spans: torch.Tensor           # [B, 2] half-open token ranges in row span_rows[b]; (0, 0) = none
    retrieved_spans: torch.Tensor       # [B, 2]
    span_rows: torch.Tensor             # [B] the row each sample's spans index
    pixel_values: torch.Tensor | None   # [images, 3, H, W] in placement order; None without images
    caption_input_ids: torch.Tensor     # [B, Tc] the TGA text-only forward's input, right-padded
    caption_attention_mask: torch.Tensor  # [B, Tc]
    caption_spans: torch.Tensor         # [B, 2] caption tokens in caption_input_ids; (0, 0) = none
    datasets: list[str] = dataclasses.field(default_factory=list)  # [B] the data set of each sample

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def packed(self) -> bool:
        return self.attention_mask is None

    def to(self, device: torch.device | str) -> Batch:
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)})


def collate(samples: list[Encoded], pad_id: int, packed: bool = False, single_row: bool = True) -> Batch:
    """Right-padded rows, or with `packed` padding-free rows: one row (flash-attention's varlen
    kernels) or, `single_row=False`, first-fit-decreasing rows as long as the longest sample (dense
    attention then costs no more than the padded batch). The label of a packed sample's first token
    is ignored: under the LM's one-token shift it is the target of the previous sample's last one."""
    lengths = [len(s.text.input_ids) for s in samples]
    rows = _place(lengths, single_row) if packed else [[i] for i in range(len(samples))]
    order = [index for row in rows for index in row]
    placed = [samples[i] for i in order]
    width = max(1, max(sum(lengths[i] for i in row) for row in rows))
    input_ids, labels, position_ids, span_rows, offsets = [], [], [], [], []
    for r, row in enumerate(rows):
        ids, labs = [], []
        for index in row:
            text = samples[index].text
            span_rows.append(r)
            offsets.append(len(ids))
            ids += text.input_ids
            labs += ([IGNORE_INDEX] + text.labels[1:]) if packed else text.labels
        fill = width - len(ids)
        input_ids.append(ids + [pad_id] * fill)
        labels.append(labs + [IGNORE_INDEX] * fill)
        # packed: the pad tokens that end a row form a segment of their own, with ignored labels
        position_ids.append([p for i in row for p in range(lengths[i])] + list(range(fill)))
    images = [s.pixel_values for s in placed if s.pixel_values is not None]
    long = dict(dtype=torch.long)
    return Batch(
        keys=[s.key for s in placed],
        input_ids=torch.tensor(input_ids, **long),
        labels=torch.tensor(labels, **long),
        attention_mask=None if packed else torch.tensor(
            [[1] * lengths[i] + [0] * (width - lengths[i]) for i in order], **long),
        position_ids=torch.tensor(position_ids, **long) if packed else None,
        seq_lens=torch.tensor([lengths[i] for i in order], **long),
        image_spans=_spans([s.text.image_span for s in placed], offsets),
        retrieved_spans=_spans([s.text.retrieved_span for s in placed], offsets),
        span_rows=torch.tensor(span_rows, **long),
        pixel_values=torch.stack(images) if images else None,
        **_captions(placed, pad_id),
        datasets=[s.dataset for s in placed],
    )


def _place(lengths: list[int], single_row: bool) -> list[list[int]]:
    """Sample indices per packed row: all in one, or first-fit-decreasing (stable) into rows of
    the longest sample's length."""
    if single_row:
        return [list(range(len(lengths)))]
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), len(rows))
        if row == len(rows):
            rows.append([])
            room.append(max(lengths))
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def _spans(values: list[Span | None], offsets: list[int]) -> torch.Tensor:
    return torch.tensor([(v[0] + o, v[1] + o) if v is not None else (0, 0)
                         for v, o in zip(values, offsets)], dtype=torch.long)


def _captions(samples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    # A sample without caption gets one attended pad token: a fully masked attention row turns
    # into NaN in SDPA. Its caption span stays (0, 0), so it never reaches the loss.
    captions = [s.text.caption_input_ids or [pad_id] for s in samples]
    width = max(len(c) for c in captions)
    return {
        "caption_input_ids": torch.tensor([c + [pad_id] * (width - len(c)) for c in captions], dtype=torch.long),
        "caption_attention_mask": torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in captions],
                                               dtype=torch.long),
        "caption_spans": _spans([s.text.caption_span for s in samples], [0] * len(samples)),
    }
