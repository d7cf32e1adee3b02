"""Shard sample → model inputs → the micro-batch, one typed `Batch`, right-padded or packed.

`SampleEncoder` runs inside data-loader workers, one sample at a time: image pixels (LLaVA-1.5
pad-to-square) and the TGA prompt (pipeline.tga.prompt). `collate` makes the batch: everything
downstream (the TGA step, the metrics, the FLOP counter) reads a `Batch`'s attributes, and this is
the only module that lays one out. Samples are *placed* into rows (one per sample when
padded; first-fit when packed), and every per-sample field — keys, spans, caption inputs, images —
follows that placement order, which is the order Llava fills image tokens with image features.
A packed batch also carries its segment boundaries (`cu_seq_lens`, flash-attention's varlen
arguments) and may carry the TGA caption inputs as segments of its own rows (`caption_rows`).
"""
from __future__ import annotations

import dataclasses
import io

import torch
from PIL import Image

from pipeline.conventions import Reject
from pipeline.tga.prompt import IGNORE_INDEX, EncodedPrompt, Span, build_sample


@dataclasses.dataclass
class EncodedSample:
    key: str
    text: EncodedPrompt            # token ids, labels and the spans TGA pools over
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

    def __call__(self, sample) -> EncodedSample | Reject:
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
        if isinstance(text, Reject):
            return text
        # the join wrote image bytes exactly for the records whose first turn holds the placeholder
        try:
            pixels = self.pixels(sample.image) if sample.image is not None else None
        except (OSError, ValueError) as err:
            return Reject("undecodable_image", f"{type(err).__name__}: {err}")
        return EncodedSample(sample.key, text, pixels, getattr(sample, "dataset", ""))


_HOST_FIELDS = frozenset({"seq_lens", "image_spans", "retrieved_spans", "span_rows", "caption_spans", "caption_lens",
                          "caption_rows"})


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
    # the TGA text-only forward's input, right-padded [B, Tc]; None when the captions are in the rows
    caption_input_ids: torch.Tensor | None
    caption_attention_mask: torch.Tensor | None  # [B, Tc]
    caption_spans: torch.Tensor         # [B, 2] caption tokens in caption_input_ids, or in row caption_rows[b]
    caption_lens: torch.Tensor          # [B] tokens of each caption input (prefix + caption); 0 = none
    caption_rows: torch.Tensor | None = None  # [B] the row of each caption segment; None: separate inputs
    # packed: segment starts over the flattened rows, then their total (int32, [segments + 1]), and
    # the longest segment: flash-attention's varlen arguments, so no layer derives them from position_ids
    cu_seq_lens: torch.Tensor | None = None
    max_length: int = 0
    datasets: list[str] = dataclasses.field(default_factory=list)  # [B] the data set of each sample

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def packed(self) -> bool:
        return self.attention_mask is None

    def to(self, device: torch.device | str) -> Batch:
        """The model's inputs on `device`; the span and length metadata stay on the host, where the
        TGA pooling reads them as index lists (on a GPU each read would wait for the device)."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor) and f.name not in _HOST_FIELDS})


def collate(samples: list[EncodedSample], pad_id: int, packed: bool = False, single_row: bool = True,
            captions_in_row: bool = False) -> Batch:
    """Right-padded rows, or with `packed` padding-free rows: one row (flash-attention's varlen
    kernels) or, `single_row=False`, first-fit-decreasing rows as long as the longest sample (dense
    attention then costs no more than the padded batch). The label of a packed sample's first token
    is ignored: under the LM's one-token shift it is the target of the previous sample's last one.

    `captions_in_row` (packed only): each sample's caption input becomes one more segment of the
    rows, after the samples (positions from 0, labels ignored), so that the multimodal forward also
    gives the TGA caption targets (pipeline/train/step.py) and no separate forward is needed."""
    if captions_in_row and not packed:
        raise ValueError("captions_in_row needs packed rows (loader.packing: true)")
    lengths = [len(s.text.input_ids) for s in samples]
    rows = _place(lengths, single_row) if packed else [[i] for i in range(len(samples))]
    order = [index for row in rows for index in row]
    placed = [samples[i] for i in order]
    # the segments of each row: (placed index, is a caption, token ids, labels)
    placed_index = iter(range(len(order)))
    segments = [[(next(placed_index), False, samples[i].text.input_ids,
                  ([IGNORE_INDEX] + samples[i].text.labels[1:]) if packed else samples[i].text.labels)
                 for i in row] for row in rows]
    if captions_in_row:
        _append_captions(segments, [s.text.caption_input_ids for s in placed], single_row)
    width = max(1, max(sum(len(seg[2]) for seg in row) for row in segments))
    input_ids, labels, position_ids, starts, where = _lay_out(segments, width, pad_id)
    offsets = [where[k, False][1] for k in range(len(placed))]
    images = [s.pixel_values for s in placed if s.pixel_values is not None]
    long = dict(dtype=torch.long)
    bounds = torch.tensor(starts + [len(segments) * width], dtype=torch.int32)
    captions = _captions(placed, pad_id) if not captions_in_row else _row_captions(placed, where)
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
        span_rows=torch.tensor([where[k, False][0] for k in range(len(placed))], **long),
        pixel_values=torch.stack(images) if images else None,
        **captions,
        cu_seq_lens=bounds if packed else None,
        max_length=int(bounds.diff().max()) if packed else 0,
        datasets=[s.dataset for s in placed],
    )


def _lay_out(segments: list[list[tuple]], width: int, pad_id: int):
    """Rows of `width` tokens from their segments: (input ids, labels, position ids — each [R][width]
    —, segment starts over the flattened rows, and (placed index, caption) -> (row, offset))."""
    input_ids, labels, position_ids, starts = [], [], [], []
    where: dict[tuple[int, bool], tuple[int, int]] = {}
    for r, row in enumerate(segments):
        ids, labs, pos = [], [], []
        for k, caption, seg_ids, seg_labels in row:
            where[k, caption] = (r, len(ids))
            starts.append(r * width + len(ids))
            ids += seg_ids
            labs += seg_labels
            pos += range(len(seg_ids))
        fill = width - len(ids)
        if fill:  # packed: the pad tokens that end a row form a segment of their own, labels ignored
            starts.append(r * width + len(ids))
        input_ids.append(ids + [pad_id] * fill)
        labels.append(labs + [IGNORE_INDEX] * fill)
        position_ids.append(pos + list(range(fill)))
    return input_ids, labels, position_ids, starts, where


def _append_captions(segments: list[list[tuple]], captions: list[list[int]], single_row: bool) -> None:
    """Each caption input as a segment of its own (labels ignored), in sample order: at the end of
    the one row, or first-fit into the rows' free room (new rows as needed, all as long as the
    longest segment). A sample without caption gets none."""
    used = [sum(len(seg[2]) for seg in row) for row in segments]
    width = max(used + [len(c) for c in captions])
    for k, caption in enumerate(captions):
        if not caption:
            continue
        r = 0 if single_row else next((r for r, u in enumerate(used) if width - u >= len(caption)), len(used))
        if r == len(used):
            used.append(0)
            segments.append([])
        used[r] += len(caption)
        segments[r].append((k, True, caption, [IGNORE_INDEX] * len(caption)))


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


def _row_captions(samples: list[EncodedSample], where: dict[tuple[int, bool], tuple[int, int]]) -> dict:
    at = [where.get((k, True)) for k in range(len(samples))]  # (row, offset) of each caption segment
    return {"caption_input_ids": None, "caption_attention_mask": None,
            "caption_spans": _spans([s.text.caption_span if a else None for s, a in zip(samples, at)],
                                    [a[1] if a else 0 for a in at]).reshape(-1, 2),
            "caption_lens": _caption_lens(samples),
            "caption_rows": torch.tensor([a[0] if a else 0 for a in at], dtype=torch.long)}


def _caption_lens(samples: list[EncodedSample]) -> torch.Tensor:
    return torch.tensor([len(s.text.caption_input_ids) for s in samples], dtype=torch.long)


def _captions(samples: list[EncodedSample], pad_id: int) -> dict[str, torch.Tensor]:
    # A sample without caption gets one attended pad token: a fully masked attention row turns
    # into NaN in SDPA. Its caption span stays (0, 0), so it never reaches the loss.
    captions = [s.text.caption_input_ids or [pad_id] for s in samples]
    width = max(len(c) for c in captions)
    return {
        "caption_input_ids": torch.tensor([c + [pad_id] * (width - len(c)) for c in captions], dtype=torch.long),
        "caption_attention_mask": torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in captions],
                                               dtype=torch.long),
        "caption_spans": _spans([s.text.caption_span for s in samples], [0] * len(samples)),
        "caption_lens": _caption_lens(samples),
    }
