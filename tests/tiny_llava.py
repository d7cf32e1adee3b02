"""A tiny transformers Llava folder for the eval tools' tests, built without training.

Same assembly and processor as `pipeline.export --format hf` (tiny-world CLIP + the tiny LLM that
refuses toxic text, a seeded random projector), plus the `tga_training.json` an export writes, so
the tools see exactly what they see for one of our runs. Seconds instead of a stage-1 run.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.export import build_processor, training_info
from pipeline.model.assemble import build_llava
from pipeline.train.config import TrainConfig


def build_tiny_llava(world, out: Path, *, insert_retrieved: bool, tracking_uri: str | None = None,
                     run_id: str | None = None) -> Path:
    cfg = load_config(TrainConfig, None, [
        "stage=stage2", f"run_dir={out.parent / 'run'}", f"shards={world.root}", f"model.llm={world.llm}",
        f"model.vision_tower={world.clip}", "model.dtype=fp32", "model.attn_implementation=sdpa",
        "trainable=[projector, llm]", "prompt.template=tokenizer",
        f"prompt.insert_retrieved={str(insert_retrieved).lower()}", "prompt.max_tokens=320", "tga.layers=[2, 3, 4]"])
    torch.manual_seed(0)
    assembled = build_llava(cfg.model, "cpu")
    processor = build_processor(assembled, cfg)
    out.mkdir(parents=True)
    assembled.model.save_pretrained(out)
    processor.save_pretrained(out)
    info = training_info(cfg, out.parent / "run" / "checkpoints", step=0)
    info.update(tracking_uri=tracking_uri, run_id=run_id)
    assert info["prompt"] == dataclasses.asdict(cfg.prompt)
    (out / "tga_training.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
