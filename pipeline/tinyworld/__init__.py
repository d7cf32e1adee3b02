"""The tiny world: a deterministic, self-contained stand-in for the real data and models.

`python -m pipeline.tinyworld --out DIR [--seed 0]` writes scene images, LLaVA JSON for both
stages, a caption corpus with toxic snippets, toxic eval scenes, and tiny LLM / CLIP / tokenizer
folders that load with `from_pretrained`, so every stage runs with no download and no GPU.
"""
from .world import WorldPaths, ensure, generate, stale_reason

__all__ = ["WorldPaths", "ensure", "generate", "stale_reason"]
