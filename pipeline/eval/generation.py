"""Greedy answers of a Llava model folder to eval queries, prompted exactly as in training.

A query becomes token ids through `pipeline.tga.prompt.build_sample`, the function training
encodes every sample with: the conversation [question, placeholder answer] is encoded (chat
template, `Retrieved Text: {text}. ` before `<image>`, the image placeholder expanded to the
model's image tokens) and cut where the answer's first label begins. What the model sees before it
answers is therefore token for token what it saw in training. Pixels come from the folder's own
image processor (for our exports: CLIP preprocessing + LLaVA-1.5 pad-to-square, as in training).

Queries are answered in batches of one modality, left-padded so that every row's answer starts at
the same column.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from PIL import Image

from pipeline.analysis.model_folder import LoadedModel
from pipeline.conventions import Reject
from pipeline.eval.queries import IMAGE, EvalDataError, Query
from pipeline.tga.prompt import IGNORE_INDEX, build_sample

# Stands in for the answer so that build_sample marks where it begins; never shown to the model.
_ANSWER_PLACEHOLDER = "answer"


@dataclasses.dataclass(frozen=True)
class Generation:
    prompt: str    # the decoded prompt, its run of image tokens shown as one placeholder
    response: str


# What the tools call: queries -> one Generation per query, in order. Tests pass canned ones.
Generate = Callable[[list[Query]], list[Generation]]


@dataclasses.dataclass(frozen=True)
class PromptInputs:
    input_ids: list[int]
    pixel_values: torch.Tensor | None  # [3,H,W]


class ModelGenerator:
    """`Generate` for a loaded Llava folder: greedy decoding, `max_new_tokens` per answer."""

    def __init__(self, loaded: LoadedModel, *, template: str = "tokenizer", max_new_tokens: int = 64,
                 batch_size: int = 8):
        if not loaded.is_llava:
            raise ValueError(f"{loaded.path}: the eval tools need a Llava model folder")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be >= 1")
        self.loaded, self.template = loaded, template
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.tokenizer, self.processor = loaded.tokenizer, loaded.processor
        config = loaded.model.config
        self.image_token_id, self.num_image_tokens = config.image_token_id, config.image_seq_length
        self.max_tokens = config.get_text_config().max_position_embeddings
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    def encode(self, query: Query) -> PromptInputs:
        conversation = [{"from": "human", "value": query.question}, {"from": "gpt", "value": _ANSWER_PLACEHOLDER}]
        try:
            sample = build_sample(
                self.tokenizer, conversation, template=self.template, image_caption=None,
                retrieved_text=query.retrieved_text, insert_retrieved=query.retrieved_text is not None,
                num_image_tokens=self.num_image_tokens, max_tokens=self.max_tokens,
                image_token=self.processor.image_token)
        except ValueError as err:
            raise EvalDataError(f"query {query.id} ({query.modality}): the prompt cannot be built with "
                                f"chat template '{self.template}' ({err}); for a folder whose template "
                                "reads only list contents pass --template (e.g. vicuna_v1)") from None
        if isinstance(sample, Reject):
            raise EvalDataError(f"query {query.id} ({query.modality}): prompt rejected ({sample.reason}: "
                                f"{sample.detail})")
        answer_at = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
        pixels = self._pixels(query) if query.modality == IMAGE else None
        return PromptInputs(sample.input_ids[:answer_at], pixels)

    def shown_prompt(self, input_ids: list[int]) -> str:
        """The prompt as text, with the image's run of tokens collapsed to one placeholder."""
        collapsed = [t for i, t in enumerate(input_ids)
                     if t != self.image_token_id or i == 0 or input_ids[i - 1] != self.image_token_id]
        return self.tokenizer.decode(collapsed, skip_special_tokens=False)

    def __call__(self, queries: list[Query]) -> list[Generation]:
        results: dict[int, Generation] = {}
        for modality in sorted({q.modality for q in queries}):
            positions = [i for i, q in enumerate(queries) if q.modality == modality]
            for start in range(0, len(positions), self.batch_size):
                chunk = positions[start:start + self.batch_size]
                inputs = [self.encode(queries[i]) for i in chunk]
                for i, prompt_inputs, response in zip(chunk, inputs, self._generate(inputs)):
                    results[i] = Generation(self.shown_prompt(prompt_inputs.input_ids), response)
        return [results[i] for i in range(len(queries))]

    @torch.no_grad()
    def _generate(self, inputs: list[PromptInputs]) -> list[str]:
        device = self.loaded.model.device
        width = max(len(p.input_ids) for p in inputs)
        ids = torch.tensor([[self.pad_id] * (width - len(p.input_ids)) + p.input_ids for p in inputs])
        mask = torch.tensor([[0] * (width - len(p.input_ids)) + [1] * len(p.input_ids) for p in inputs])
        pixels = [p.pixel_values for p in inputs if p.pixel_values is not None]
        extra = {"pixel_values": torch.stack(pixels).to(device, self.loaded.model.dtype)} if pixels else {}
        out = self.loaded.model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), **extra, do_sample=False,
            max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id)
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]

    def _pixels(self, query: Query) -> torch.Tensor:
        try:
            image = Image.open(query.image).convert("RGB")
        except OSError as err:
            raise EvalDataError(f"query {query.id}: image {query.image} cannot be read ({err})") from None
        return self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
