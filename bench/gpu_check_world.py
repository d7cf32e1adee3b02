"""The GPU check's world (bench/gpu_check.py): random-weight model folders of a chosen size, tiny-world
records, the stage configs pointed at them, and micro-batches encoded as the loader's workers encode
shard samples. No downloads; everything is written to a temporary folder.

Pipeline modules are imported inside the functions: DeepSpeed reads DS_ACCELERATOR at its first
import, which bench/gpu_check.py sets from --device.
"""
from __future__ import annotations

import dataclasses
import io
import random
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

REFERENCE_LAYERS = 32  # the configs' tga.layers are the safety band of a 32-layer LLM
STAGES = ("stage1", "stage2")


@dataclasses.dataclass(frozen=True)
class Sizes:
    llm: dict                    # LlamaConfig fields; vocab_size None = the tokenizer's length
    vision: dict                 # CLIPVisionConfig fields
    batch: dict                  # stage -> micro-batch; absent: the config's loader.batch_size
    max_tokens: int | None       # None = the config's prompt.max_tokens


FULL = Sizes(llm=dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=8192, vocab_size=32000),
             vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                         image_size=336, patch_size=14),
             batch={}, max_tokens=None)
TINY = Sizes(llm=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=None),
             vision=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                         image_size=32, patch_size=8),
             batch={"stage1": 4, "stage2": 4}, max_tokens=320)



def tiny_world_records(count: int, seed: int = 0) -> list[dict]:
    """`count` stage-1 records (LCS-558K style) and `count` stage-2 ones (mix665k style, every fourth
    a text-only chat) of random tiny-world scenes, each image rendered to JPEG bytes."""
    from pipeline.tinyworld import scenes, text

    rng = random.Random(f"{seed}:gpu-check")
    records = []
    for stage in STAGES:
        for i in range(count):
            scene = scenes.sample_scene(rng)
            caption = text.caption(scene, rng)
            record = {"stage": stage, "key": f"{stage}-{i:04d}", "image": None, "caption": ""}
            if stage == "stage2" and i % 4 == 3:
                records.append({**record, "conversations": text.text_only_conversation(rng, scene)})
                continue
            jpeg = io.BytesIO()
            scenes.render(scene).save(jpeg, format="JPEG", quality=90)
            conversations = ([{"from": "human", "value": text.stage1_prompt(rng)}, {"from": "gpt", "value": caption}]
                             if stage == "stage1" else text.scene_conversation(scene, caption, rng))
            records.append({**record, "image": jpeg.getvalue(), "caption": caption, "conversations": conversations})
    return records


def write_models(tmp: Path, sizes: Sizes, records: list[dict], dev: str, dtype: torch.dtype) -> None:
    """tmp/llm (random Llama + a tokenizer trained on the records' text) and tmp/vision_tower
    (random CLIP vision tower + its image processor): the folders `build_llava` loads. Initialised
    on the device, where a 1B model takes seconds instead of minutes."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from pipeline.tga.templates import LLAMA2_SYSTEM, VICUNA_SYSTEM
    from pipeline.tinyworld.models import CLIP_MEAN, CLIP_STD
    from pipeline.tinyworld.tokenizer import train_llm_tokenizer

    # the system prompts too: a real tokenizer does not spell them out byte by byte
    tokenizer = train_llm_tokenizer([turn["value"] for r in records for turn in r["conversations"]]
                                    + [r["caption"] for r in records if r["caption"]] + [LLAMA2_SYSTEM, VICUNA_SYSTEM])
    tokenizer.model_max_length = 4096
    llm = LlamaConfig(**{**sizes.llm, "vocab_size": sizes.llm["vocab_size"] or len(tokenizer)},
                      max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(**sizes.vision, projection_dim=768, hidden_act="quick_gelu")
    torch.manual_seed(0)
    with torch.device(dev):
        LlamaForCausalLM(llm).to(dtype).save_pretrained(tmp / "llm")
        CLIPVisionModel(vision).to(dtype).save_pretrained(tmp / "vision_tower")
    tokenizer.save_pretrained(tmp / "llm")
    side = sizes.vision["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                       image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(tmp / "vision_tower")


def micro_batch(stage: str, args, sizes: Sizes) -> int:
    """--stage<N>-batch, else the size's, else configs/<stage>.yaml's loader.batch_size."""
    import yaml

    chosen = getattr(args, f"{stage}_batch") or sizes.batch.get(stage)
    return chosen or yaml.safe_load((REPO / "configs" / f"{stage}.yaml").read_text())["loader"]["batch_size"]


def stage_config(stage: str, args, sizes: Sizes, tmp: Path, attention: str, config: str | None = None):
    """configs/<stage>.yaml (or `config`, a file of that stage) with the check's model folders,
    device, attention and sizes."""
    from pipeline.config import load_config
    from pipeline.train.config import TrainConfig

    config = config or f"configs/{stage}.yaml"
    run_dir = tmp / f"run-{Path(config).stem}"
    (run_dir / "shards").mkdir(parents=True)  # never read: the batches are built here
    overrides = [f"model.llm={tmp / 'llm'}", f"model.vision_tower={tmp / 'vision_tower'}", "model.projector=null",
                 f"model.attn_implementation={attention}",
                 f"run_dir={run_dir}", f"shards={run_dir / 'shards'}", f"device={args.device}",
                 "optim.warmup_ratio=0.0", "optim.schedule=constant",
                 f"loader.batch_size={micro_batch(stage, args, sizes)}"]
    overrides += [f"prompt.max_tokens={sizes.max_tokens}"] if sizes.max_tokens else []
    cfg = load_config(TrainConfig, REPO / config, overrides)
    layers = sizes.llm["num_hidden_layers"]  # the band at the same relative depth
    band = sorted({max(1, min(layers, round(layer * layers / REFERENCE_LAYERS))) for layer in cfg.tga.layers})
    return dataclasses.replace(cfg, tga=dataclasses.replace(cfg.tga, layers=band))


def encode(assembled, cfg, records: list[dict], stage: str) -> list:
    """A micro-batch of the stage's records through `SampleEncoder`, as the loader's workers encode
    shard samples; an image sample's retrieved text is the next image record's caption."""
    from pipeline.data.batch import SampleEncoder
    from pipeline.data.shards import ShardSample
    from pipeline.conventions import Reject

    encoder = SampleEncoder(assembled.tokenizer, assembled.image_processor, num_image_tokens=assembled.num_image_tokens,
                            template=cfg.prompt.template, insert_retrieved=cfg.prompt.insert_retrieved,
                            max_tokens=cfg.prompt.max_tokens, pad_to_square=cfg.model.pad_to_square)
    own = [r for r in records if r["stage"] == stage][:cfg.loader.batch_size]
    captions = [r["caption"] for r in own if r["caption"]]
    encoded = []
    for i, r in enumerate(own):
        retrieved = [{"text": captions[(i + 1) % len(captions)], "score": 0.5, "caption_id": f"c{i}"}]
        retrieved = retrieved if r["image"] else []
        sample = encoder(ShardSample(r["key"], r["image"], {"key": r["key"], "conversations": r["conversations"],
                                                           "image_caption": r["caption"], "retrieved": retrieved}))
        if isinstance(sample, Reject):
            raise SystemExit(f"{r['key']}: rejected by SampleEncoder ({sample.reason}); raise prompt.max_tokens")
        encoded.append(sample)
    return encoded


