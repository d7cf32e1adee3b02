"""Shard sample → model inputs: image pixels (LLaVA-1.5 pad-to-square) and the TGA prompt.

Runs inside data-loader workers; everything here is per sample except `collate`.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any

import torch
from PIL import Image

from pipeline.tga.prompt import Rejected, build_sample, collate as collate_text, pack as pack_text


@dataclasses.dataclass
class Encoded:
    key: str
    text: Any                      # pipeline.tga.prompt.EncodedSample
    pixel_values: torch.Tensor | None


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
                 pad_to_square: bool = True, image_token: str = "<image>"):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.num_image_tokens, self.template = num_image_tokens, template
        self.insert_retrieved, self.max_tokens = insert_retrieved, max_tokens
        self.pad_to_square, self.image_token = pad_to_square, image_token
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
            max_tokens=self.max_tokens, image_token=self.image_token)
        if isinstance(text, Rejected):
            return text
        has_image = text.image_span is not None
        if has_image and sample.image is None:
            return Rejected("image_token_without_image")
        if sample.image is not None and not has_image:
            return Rejected("image_without_image_token")
        try:
            pixels = self.pixels(sample.image) if has_image else None
        except (OSError, ValueError) as err:
            return Rejected("undecodable_image", f"{type(err).__name__}: {err}")
        return Encoded(sample.key, text, pixels)


def collate(samples: list[Encoded], pad_id: int, packed: bool = False, single_row: bool = True) -> dict:
    """The micro-batch the model sees: right-padded rows, or with `packed` padding-free rows
    (pipeline.tga.prompt.pack: one row for flash-attention's varlen kernels, `single_row=False`
    for dense attention). Images and keys follow the order the samples were placed in, which is
    the order Llava fills image tokens with image features."""
    if packed:
        batch = pack_text([s.text for s in samples], pad_id, single_row=single_row)
        samples = [samples[i] for i in batch.pop("order")]
    else:
        batch = collate_text([s.text for s in samples], pad_id)
    images = [s.pixel_values for s in samples if s.pixel_values is not None]
    batch["pixel_values"] = torch.stack(images) if images else None
    batch["keys"] = [s.key for s in samples]
    return batch
