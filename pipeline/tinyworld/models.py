"""The tiny models: a Llama-architecture LLM and a CLIP, small enough to train and run on a laptop CPU.

Shapes follow the real ones where a code path depends on them: the CLIP text side has OpenAI's
49408-token vocabulary and 77 positions (clip-retrieval tokenizes with OpenAI's BPE), the vision
side yields 16 patch tokens + CLS like ViT-L/14-336 yields 576 + CLS, and the LLM is a plain
`LlamaForCausalLM` so every "any causal LM" path is the real one.
"""
from __future__ import annotations

import contextlib

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from .tokenizer import CLIP_CONTEXT_LENGTH, CLIP_VOCAB_SIZE

CLIP_IMAGE_SIZE = 32
CLIP_PATCH_SIZE = 8  # (32 / 8)^2 = 16 patch tokens
# OpenAI's normalisation constants, as in every openai/clip-* preprocessor config.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@contextlib.contextmanager
def deterministic_torch(seed: int, threads: int = 1):
    """Seeded, deterministic, fixed-thread torch for the duration of the block; restores the caller's
    settings and RNG after. Thread count is fixed because CPU reductions split by thread count."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.get_num_threads(), torch.get_rng_state())
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.set_num_threads(previous[2])
        torch.set_rng_state(previous[3])


def build_llm(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """Randomly initialised tiny Llama; seed the torch RNG first (see `deterministic_torch`)."""
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def build_clip() -> CLIPModel:
    """Randomly initialised tiny CLIP; seed the torch RNG first (see `deterministic_torch`)."""
    config = CLIPConfig(
        text_config=dict(
            vocab_size=CLIP_VOCAB_SIZE,
            max_position_embeddings=CLIP_CONTEXT_LENGTH,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            bos_token_id=49406,
            eos_token_id=49407,  # pooling reads the first <|endoftext|>: padding after it is ignored
            pad_token_id=0,
        ),
        vision_config=dict(
            image_size=CLIP_IMAGE_SIZE,
            patch_size=CLIP_PATCH_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,  # LLaVA reads layer -2: keep at least one layer below it
            num_attention_heads=2,
        ),
        projection_dim=32,
    )
    return CLIPModel(config)


def build_clip_processor(tokenizer: CLIPTokenizer) -> CLIPProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": CLIP_IMAGE_SIZE},
        crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def clip_token_ids(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """[N, L] ids padded with 0 after <|endoftext|>, the layout of OpenAI's `clip.tokenize`
    (what clip-retrieval feeds the text tower); L = longest text, at most 77."""
    rows = tokenizer(texts, truncation=True, max_length=CLIP_CONTEXT_LENGTH)["input_ids"]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)

