"""TGA overhead: seconds per stage-1 training step with and without the alignment loss.

    PYTHONPATH=. .venv/bin/python bench/bench_tga_overhead.py [--quick] [--world DIR]
        [--batch 8] [--steps 30] [--warmup 5] [--threads 1] [--hidden 256 --layers 8]
        [--llava-shape [--tower-hidden 256 --tower-layers 2]]

One process, one model, one batch of real tiny-world samples (SampleEncoder + collate), projector
trainable, LLM and vision tower frozen; every timed step is forward + backward + AdamW step:
  (a) plain LLaVA stage 1: LM loss only            tga_forward(...) with both TGA terms off
  (b) TGA, caption targets cached (warm)           CaptionTargets(cached=True), stage 1's path
  (c) TGA, caption targets uncached                CaptionTargets(cached=False): text forward each step
  (d) the reference's way: eager attention, output_attentions=True on the training forward and on a
      second full forward for the caption's hidden states (same TGA loss on top)
  (e) TGA with the caption inputs as segments of packed rows (caption_forward: in_row): one forward
  (f) plain, the same samples packed (the baseline of (e); packing alone changes the step a little)
Variants run round-robin (rotating order); every figure is CPU seconds of this process
(`time.process_time`), which other jobs on a shared machine inflate far less than wall time; the
table gives the median. (e)/(f) is what the captions in the row cost in compute (their tokens through
forward and backward); what they save under ZeRO-3, a second gather of the model per step, a single
process does not have. Goal: (b)/(a) <= 1.10. `--hidden/--layers` swap the tiny LLM for a random
Llama of that size (same tokenizer and vision tower) to show how the ratios move with model size.

`--llava-shape`: the token counts of LLaVA-1.5 stage 1 instead of the tiny world's 16 image
tokens. A CLIP vision tower built from config with CLIP-L/14-336's geometry (image 336, patch 14:
576 patch tokens) but, by default, reduced width and depth (`--tower-hidden 256 --tower-layers 2`;
1024 and 24 are CLIP-L itself, ~3.6 CPU seconds per image here): beside the small random LLMs a CPU
can time, a full tower would be most of the step and hide the ratios asked about, while next to a
7B LLM it is about 2% of a stage-1 step. The prompt is configs/stage1.yaml's (llama2 template,
retrieved text inserted), the samples are the tiny world's LCS-558K-style ones (short instruction,
one-line caption), the LLM a random Llama with 4096 positions (default 512 wide, 16 layers), the
alignment band configs/stage1.yaml's (10..18 of 32 layers) at the same relative depth. Goal there
(#15): (c)/(a) <= 1.10, as a one-epoch stage 1 pays (c) on every step.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers.utils import logging as transformers_logging

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from pipeline.conventions import Reject  # noqa: E402
from pipeline.data.batch import Batch, SampleEncoder, collate  # noqa: E402
from pipeline.data.shards import ShardSample  # noqa: E402
from pipeline.model.assemble import AssembledModel, ModelConfig, apply_freeze, build_llava  # noqa: E402
from pipeline.tga.loss import TGAConfig, pool_caption_targets, tga_loss  # noqa: E402
from pipeline.tga.prompt import IGNORE_INDEX  # noqa: E402
from pipeline.tinyworld import WorldPaths, ensure  # noqa: E402
from pipeline.train.step import CaptionTargets, tga_forward  # noqa: E402

TINY_CONFIG = REPO / "configs" / "tiny" / "stage1.yaml"
STAGE1_CONFIG = REPO / "configs" / "stage1.yaml"
STAGE1_LLM_LAYERS = 32  # configs/stage1.yaml's alignment band is for a 32-layer LLM (Mistral-7B)
LLAVA_IMAGE_SIZE, LLAVA_PATCH = 336, 14  # CLIP-L/14-336: 24 x 24 = 576 patch tokens
STEP_FRACTION = 0.0  # both alignment terms at full weight: the most work TGA ever does per step


def default_world_dir() -> Path:
    """The tests' tiny-world cache (keyed by the generator's source), so a bench reuses their world."""
    from tests.conftest import _tinyworld_cache
    return _tinyworld_cache()


def tiny_world(folder: Path | None) -> WorldPaths:
    folder = Path(folder) if folder is not None else default_world_dir()
    folder.parent.mkdir(parents=True, exist_ok=True)
    return ensure(folder, seed=0)


def stage1_settings(config: Path = TINY_CONFIG) -> tuple[dict, TGAConfig]:
    """Prompt settings and TGA config of a stage-1 config (default: the tiny run's)."""
    raw = yaml.safe_load(config.read_text())
    return raw["prompt"], TGAConfig(**raw["tga"])


def llava_tower(hidden: int, layers: int, out: Path) -> Path:
    """A random CLIP vision tower with CLIP-L/14-336's image and patch size (576 patch tokens) and
    the given width and depth, with an image processor for 336 px (OpenAI CLIP's normalisation),
    saved as an HF folder that build_llava loads like any CLIP."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    heads = max(1, hidden // 64)
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=LLAVA_IMAGE_SIZE, patch_size=LLAVA_PATCH,
                              hidden_act="quick_gelu")
    torch.manual_seed(0)
    CLIPVisionModel(config).save_pretrained(out)
    side = {"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE}
    CLIPImageProcessor(size={"shortest_edge": LLAVA_IMAGE_SIZE}, crop_size=side,
                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(out)
    return out


def real_batch(world: WorldPaths, assembled: AssembledModel, prompt: dict, batch_size: int,
               **layout) -> Batch:
    """The first `batch_size` stage-1 samples, encoded as the loader encodes shard samples; the
    retrieved text is the next sample's caption (a related-but-different text, as retrieval gives)."""
    records = json.loads(world.stage1_json.read_text())[:batch_size + 1]
    if len(records) <= batch_size:
        raise SystemExit(f"{world.stage1_json}: {len(records)} records, need {batch_size + 1}")
    encoder = SampleEncoder(assembled.tokenizer, assembled.image_processor,
                            num_image_tokens=assembled.num_image_tokens, template=prompt["template"],
                            insert_retrieved=prompt["insert_retrieved"], max_tokens=prompt["max_tokens"])
    encoded = []
    for i, record in enumerate(records[:batch_size]):
        caption = record["conversations"][1]["value"]
        retrieved = records[i + 1]["conversations"][1]["value"]
        meta = {"key": f"s1_{i:06d}", "conversations": record["conversations"], "image_caption": caption,
                "retrieved": [{"text": retrieved, "score": 0.5, "caption_id": f"c{i + 1}"}]}
        sample = encoder(ShardSample(meta["key"], (world.images / record["image"]).read_bytes(), meta))
        if isinstance(sample, Reject):
            raise SystemExit(f"{world.stage1_json}: record {record['id']} rejected: {sample.reason}")
        encoded.append(sample)
    return collate(encoded, assembled.tokenizer.pad_token_id, **layout)


def scaled_llm(world: WorldPaths, hidden: int, layers: int, out: Path, max_positions: int | None = None) -> Path:
    """A randomly initialised Llama of the given size with the tiny tokenizer, saved as an HF folder
    (`max_positions`: default the tiny LLM's)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tiny = LlamaConfig.from_pretrained(world.llm)
    heads = max(4, hidden // 64)
    if hidden % heads:
        raise SystemExit(f"--hidden {hidden} is not divisible by {heads} attention heads")
    config = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), intermediate_size=hidden * 11008 // 4096,  # LLaMA's ratio
        max_position_embeddings=max_positions or tiny.max_position_embeddings, vocab_size=tiny.vocab_size,
        tie_word_embeddings=False, bos_token_id=tiny.bos_token_id, eos_token_id=tiny.eos_token_id,
        pad_token_id=tiny.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(world.llm).save_pretrained(out)
    return out


def benchmark_arguments(description: str, *, batch: int, steps: int, warmup: int) -> argparse.ArgumentParser:
    """The options the stage-2 benchmarks share: world, batch, timed and warm-up rounds, threads,
    the --hidden/--layers random LLM, --quick."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--world", type=Path)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--quick", action="store_true", help="1 warm-up round, 3 timed rounds")
    return parser


def llm_for(world: WorldPaths, tga: TGAConfig, hidden: int | None, layers: int | None,
            tmp: Path) -> tuple[Path, TGAConfig]:
    """The tiny world's LLM, or with --hidden/--layers a random Llama of that size (written under
    `tmp`) and the alignment band moved to the same relative depth."""
    if hidden is None and layers is None:
        return world.llm, tga
    if hidden is None or layers is None:
        raise SystemExit("give both --hidden and --layers")
    tiny_layers = json.loads((world.llm / "config.json").read_text())["num_hidden_layers"]
    return scaled_llm(world, hidden, layers, tmp / "llm"), scaled_layers(tga, tiny_layers, layers)


def llava_shape_llm(world: WorldPaths, tga: TGAConfig, hidden: int, layers: int, tmp: Path) -> tuple[Path, TGAConfig]:
    """The --llava-shape LLM: a random Llama with LLaMA-2's 4096 positions (a 576-token image does
    not fit the tiny LLM's 512) and configs/stage1.yaml's band at the same relative depth."""
    return (scaled_llm(world, hidden, layers, tmp / "llm", max_positions=4096),
            scaled_layers(tga, STAGE1_LLM_LAYERS, layers))


def scaled_layers(tga: TGAConfig, tiny_layers: int, layers: int) -> TGAConfig:
    """The tiny config's alignment band at the same relative depth of a model with `layers` layers."""
    band = sorted({max(1, min(layers, round(layer * layers / tiny_layers))) for layer in tga.layers})
    return TGAConfig(layers=band, align_weight=tga.align_weight, pair_weight=tga.pair_weight)


def reference_forward(model, batch: Batch, step_fraction: float, cfg: TGAConfig):
    """What the released code did: attention maps on both forwards (forcing eager attention) and a
    second full forward, LM head included, for the caption hidden states. The text forward runs
    without grad: with a frozen LLM in stage 1 it builds no graph either way."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                pixel_values=batch.pixel_values, labels=batch.labels,
                output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        text = model(input_ids=batch.caption_input_ids, attention_mask=batch.caption_attention_mask,
                     output_hidden_states=True, output_attentions=True)
    targets, valid = pool_caption_targets(text.hidden_states, batch.caption_spans, cfg.layers)
    return tga_loss(out.loss, out.hidden_states, batch.image_spans, batch.retrieved_spans, targets,
                    valid, step_fraction, cfg)


def training_step(model, optimizer, loss_fn) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss, _ = loss_fn()
    loss.backward()
    optimizer.step()


def attention_map_megabytes(model, batch: dict) -> float:
    """Size of the attention maps one step of (d) materialises (multimodal + text forward)."""
    with torch.no_grad():
        mm = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   pixel_values=batch.pixel_values, output_attentions=True)
        text = model(input_ids=batch.caption_input_ids, attention_mask=batch.caption_attention_mask,
                     output_attentions=True)
    maps = [a for a in (*mm.attentions, *text.attentions) if a is not None]
    return sum(a.numel() * a.element_size() for a in maps) / 2**20


def time_round_robin(jobs: dict, warmup: int, steps: int, clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each job per round; rounds rotate the order so no job always runs first.
    `clock=time.process_time` counts this process's CPU seconds: on a box shared with other jobs
    the wall time moves with their load (here two variants of near-equal work came out 1.46x apart)."""
    names = list(jobs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + steps):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            started = clock()
            jobs[name]()
            if round_index >= warmup:
                seconds[name].append(clock() - started)
    return seconds


def build_models(llm: Path, tower: Path):
    """The SDPA model for (a)-(c) and an eager twin with the same projector weights for (d)."""
    torch.manual_seed(0)
    main = build_llava(ModelConfig(llm=llm, vision_tower=tower, attn_implementation="sdpa"))
    eager = build_llava(ModelConfig(llm=llm, vision_tower=tower, attn_implementation="eager"))
    eager.model.model.multi_modal_projector.load_state_dict(main.model.model.multi_modal_projector.state_dict())
    for assembled in (main, eager):
        apply_freeze(assembled.model, ["projector"])
        assembled.model.train()
    return main, eager


def run(world: WorldPaths, llm: Path, tower: Path, tga: TGAConfig, prompt: dict, args) -> dict[str, float]:
    main, eager = build_models(llm, tower)
    batch = real_batch(world, main, prompt, args.batch)
    # SDPA's packed layout (first-fit rows of the longest sample), plain and with the captions in the rows
    packed = real_batch(world, main, prompt, args.batch, packed=True, single_row=False)
    in_row = real_batch(world, main, prompt, args.batch, packed=True, single_row=False, captions_in_row=True)
    model, ref_model = main.model, eager.model
    optimizers = {name: torch.optim.AdamW(m.model.multi_modal_projector.parameters(), lr=1e-3)
                  for name, m in (("main", model), ("eager", ref_model))}
    cached = CaptionTargets(tga.layers, cached=True, cache_size=len(batch))
    cached(model, batch)  # warm: stage 1 fills the cache in its first epoch
    uncached = CaptionTargets(tga.layers, cached=False)
    lm_only = dataclasses.replace(tga, align_on=False, pair_on=False)
    step = {
        "a": lambda: training_step(model, optimizers["main"], lambda: tga_forward(
            model, batch, cached, STEP_FRACTION, lm_only)),
        "b": lambda: training_step(model, optimizers["main"], lambda: tga_forward(
            model, batch, cached, STEP_FRACTION, tga)),
        "c": lambda: training_step(model, optimizers["main"], lambda: tga_forward(
            model, batch, uncached, STEP_FRACTION, tga)),
        "d": lambda: training_step(ref_model, optimizers["eager"], lambda: reference_forward(
            ref_model, batch, STEP_FRACTION, tga)),
        "e": lambda: training_step(model, optimizers["main"], lambda: tga_forward(
            model, in_row, uncached, STEP_FRACTION, tga)),
        "f": lambda: training_step(model, optimizers["main"], lambda: tga_forward(
            model, packed, uncached, STEP_FRACTION, lm_only)),
        "text": lambda: uncached(model, batch),
        "tower": lambda: vision_forward(model, batch),
    }
    seconds = time_round_robin(step, args.warmup, args.steps, clock=time.process_time)
    if cached.forwards != 1:
        raise RuntimeError(f"cached caption targets ran {cached.forwards} text forwards, expected 1")
    median = {name: statistics.median(values) for name, values in seconds.items()}
    text_config = model.config.text_config
    print(f"\nmodel: LLM hidden {text_config.hidden_size}, {text_config.num_hidden_layers} layers, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params "
          f"(projector {sum(p.numel() for p in model.model.multi_modal_projector.parameters()) / 1e6:.3f} M "
          f"trainable); alignment layers {tga.layers}")
    print(f"batch: {len(batch)} samples, {batch.input_ids.shape[1]} tokens "
          f"({main.num_image_tokens} image tokens), caption input {batch.caption_input_ids.shape[1]} tokens; "
          f"median of {args.steps} steps after {args.warmup} warm-up, {torch.get_num_threads()} thread(s); "
          f"seconds are CPU seconds of this process")
    print(token_counts(batch))
    vision = model.config.vision_config
    print(f"vision tower: {vision.image_size} px, patch {vision.patch_size}, hidden {vision.hidden_size}, "
          f"{vision.num_hidden_layers} layers; its forward alone: {median['tower']:.4f} s = "
          f"{median['tower'] / median['a']:.1%} of (a)")
    labels = {"a": "(a) plain LLaVA stage 1 (LM loss only)", "b": "(b) TGA, cached caption targets",
              "c": "(c) TGA, uncached (text forward each step)",
              "d": "(d) reference: eager + attentions, 2nd forward",
              "e": "(e) TGA, captions in the packed rows", "f": "(f) plain, packed rows"}
    print(f"{'variant':<48}{'s/step':>10}{'vs (a)':>9}")
    for name, label in labels.items():
        print(f"{label:<48}{median[name]:>10.4f}{median[name] / median['a']:>8.2f}x")
    for name in ("b", "c", "d"):
        print(f"ratio ({name})/(a) = {median[name] / median['a']:.3f}")
    print(f"ratio (e)/(f) = {median['e'] / median['f']:.3f} (packed rows {tuple(packed.input_ids.shape)}, with the "
          f"captions {tuple(in_row.input_ids.shape)})")
    print(f"uncached text forward alone: {median['text']:.4f} s = {median['text'] / median['a']:.1%} of (a), "
          f"{median['text'] / median['c']:.1%} of (c)")
    print(f"attention maps materialised per step by (d): {attention_map_megabytes(ref_model, batch):.2f} MB")
    for name in ("b", "c"):
        print(f"goal ({name})/(a) <= 1.10: {'met' if median[name] / median['a'] <= 1.10 else 'NOT met'}")
    return median


def token_counts(batch: Batch) -> str:
    """What the two forwards see per sample: multimodal tokens, caption tokens and the caption
    forward's input (chat prefix + caption), and the share of labelled tokens (the logits kept)."""
    spans = batch.caption_spans
    captions = (spans[:, 1] - spans[:, 0]).float()
    caption_inputs = batch.caption_attention_mask.sum(1).float()
    labelled = int((batch.labels != IGNORE_INDEX).sum())
    return (f"per sample: {batch.seq_lens.float().mean():.0f} tokens; caption {captions.mean():.0f} tokens "
            f"({captions.min():.0f}-{captions.max():.0f}), caption forward input {caption_inputs.mean():.0f} tokens; "
            f"labelled {labelled / int(batch.seq_lens.sum()):.1%} of the tokens")


def vision_forward(model, batch: Batch) -> None:
    """The frozen tower as every variant runs it (features of layer -2), no grad."""
    with torch.no_grad():
        model.model.get_image_features(pixel_values=batch.pixel_values,
                                       vision_feature_layer=model.config.vision_feature_layer,
                                       vision_feature_select_strategy=model.config.vision_feature_select_strategy)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, help="tiny world folder (generated there if missing; "
                        "default: the tests' cache)")
    parser.add_argument("--quick", action="store_true", help="3 timed steps, 1 warm-up (smoke test)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--hidden", type=int, help="random Llama of this hidden size instead of the tiny LLM")
    parser.add_argument("--layers", type=int, help="its number of layers (with --hidden)")
    parser.add_argument("--llava-shape", action="store_true",
                        help="576 image tokens (336 px, patch 14), configs/stage1.yaml's prompt and band; "
                             "LLM default --hidden 512 --layers 16")
    parser.add_argument("--tower-hidden", type=int, default=256, help="--llava-shape tower width (CLIP-L: 1024)")
    parser.add_argument("--tower-layers", type=int, default=2, help="--llava-shape tower depth (CLIP-L: 24)")
    args = parser.parse_args(argv)
    if (args.hidden is None) != (args.layers is None):
        parser.error("--hidden and --layers go together")
    if args.llava_shape and args.hidden is None:
        args.hidden, args.layers = 512, 16
    if args.quick:
        args.steps, args.warmup = 3, 1
    if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--batch, --steps and --threads must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(args.threads)
    transformers_logging.set_verbosity_error()  # load reports of the tiny CLIP's unused text tower
    transformers_logging.disable_progress_bar()
    print(f"machine load (1/5/15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}, "
          f"{os.cpu_count()} CPUs")
    world = tiny_world(args.world)
    with tempfile.TemporaryDirectory() as tmp:
        if args.llava_shape:
            prompt, tga = stage1_settings(STAGE1_CONFIG)
            llm, tga = llava_shape_llm(world, tga, args.hidden, args.layers, Path(tmp))
            tower = llava_tower(args.tower_hidden, args.tower_layers, Path(tmp) / "clip")
        else:
            prompt, tga = stage1_settings()
            llm, tga = llm_for(world, tga, args.hidden, args.layers, Path(tmp))
            tower = world.clip
        run(world, llm, tower, tga, prompt, args)
    print(f"machine load after (1/5/15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
