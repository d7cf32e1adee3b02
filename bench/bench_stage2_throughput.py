"""Stage-2 throughput: tokens/s of padded vs packed micro-batches, and what the TGA text forward costs.

    PYTHONPATH=. .venv/bin/python bench/bench_stage2_throughput.py [--quick] [--world DIR]
        [--batch 16] [--steps 20] [--warmup 3] [--threads 1] [--hidden 256 --layers 8]

One process, one tiny Llava with stage 2's trainable parts (projector + LLM), one micro-batch of
real stage-2 samples (multi-turn, text-only and image samples mixed: SampleEncoder as the loader
runs it), AdamW on the trainable parameters. Every timed step is forward + backward + optimizer step:
  (a) padded batch, TGA (caption targets from the current weights: the text forward each step)
  (b) the same samples packed into rows as long as the longest sample (dense attention's layout), TGA
  (b1) the same samples packed into one row (flash-attention varlen's layout), TGA
  (b2) as (b), with the caption inputs as segments of the rows (caption_forward: in_row): no text forward
  (c) padded batch, LM loss only (plain LLaVA stage 2)
  text: the TGA text-side forward alone (no-grad, hidden states only)
Variants run round-robin with a rotating order; medians. Tokens/s counts real tokens only (the
padding a padded batch computes on is waste). (b1) on CPU runs SDPA with a block-diagonal mask over
the whole row, quadratic in the row's length: it is here to show why the CPU/SDPA path packs into
short rows (b) instead; on GPU flash-attention's varlen kernels skip the masked blocks. (b2)/(b) is
the compute trade of the captions in the row (their tokens through forward and backward, against a
separate shallower forward); what it saves under ZeRO-3, a second gather of the model per step, a
single process does not have.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from transformers.utils import logging as transformers_logging

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from bench_tga_overhead import benchmark_arguments, llm_for, time_round_robin, tiny_world  # noqa: E402
from pipeline.conventions import Reject  # noqa: E402
from pipeline.data.batch import SampleEncoder, collate  # noqa: E402
from pipeline.data.shards import ShardSample  # noqa: E402
from pipeline.model.assemble import ModelConfig, apply_freeze, build_llava  # noqa: E402
from pipeline.tga.loss import TGAConfig  # noqa: E402
from pipeline.train.step import CaptionTargets, tga_forward  # noqa: E402

TINY_CONFIG = REPO / "configs" / "tiny" / "stage2.yaml"


def stage2_samples(world, assembled, prompt: dict, batch_size: int) -> list:
    """The first `batch_size` encodable stage-2 records; image samples get the next record's first
    answer as retrieved text and their own as caption (what the retrieval join provides)."""
    records = json.loads(world.stage2_json.read_text())
    encoder = SampleEncoder(assembled.tokenizer, assembled.image_processor,
                            num_image_tokens=assembled.num_image_tokens, template=prompt["template"],
                            insert_retrieved=prompt["insert_retrieved"], max_tokens=prompt["max_tokens"])
    encoded = []
    for i, record in enumerate(records[:-1]):
        image = (world.images / record["image"]).read_bytes() if "image" in record else None
        meta = {"key": f"s2_{i:06d}", "conversations": record["conversations"],
                "image_caption": record["conversations"][1]["value"] if image else "",
                "retrieved": [{"text": records[i + 1]["conversations"][1]["value"], "score": 0.5,
                               "caption_id": f"c{i}"}] if image else []}
        sample = encoder(ShardSample(meta["key"], image, meta))
        if not isinstance(sample, Reject):
            encoded.append(sample)
        if len(encoded) == batch_size:
            return encoded
    raise SystemExit(f"{world.stage2_json}: fewer than {batch_size} encodable records")


def main(argv: list[str] | None = None) -> int:
    args = benchmark_arguments(__doc__.split("\n")[0], batch=16, steps=20, warmup=3).parse_args(argv)
    if args.quick:
        args.warmup, args.steps = 1, 3
    torch.set_num_threads(args.threads)
    transformers_logging.set_verbosity_error()
    load_start = os.getloadavg()[0]

    world = tiny_world(args.world)
    raw = yaml.safe_load(TINY_CONFIG.read_text())
    tga = TGAConfig(**raw["tga"])
    with tempfile.TemporaryDirectory() as tmp:
        llm, tga = llm_for(world, tga, args.hidden, args.layers, Path(tmp))
        torch.manual_seed(0)
        assembled = build_llava(ModelConfig(llm=llm, vision_tower=world.clip))
    model = assembled.model
    apply_freeze(model, ["projector", "llm"])
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    samples = stage2_samples(world, assembled, raw["prompt"], args.batch)
    pad = assembled.tokenizer.pad_token_id
    padded = collate(samples, pad)
    packed = collate(samples, pad, packed=True, single_row=False)
    one_row = collate(samples, pad, packed=True)
    in_row = collate(samples, pad, packed=True, single_row=False, captions_in_row=True)
    targets = CaptionTargets(tga.layers, cached=False)  # the LLM trains: targets from current weights
    lm_only = dataclasses.replace(tga, align_on=False, pair_on=False)

    def step(batch, use_tga=True):
        optimizer.zero_grad(set_to_none=True)
        loss, _ = tga_forward(model, batch, targets, 0.0, tga if use_tga else lm_only)
        loss.backward()
        optimizer.step()

    seconds = time_round_robin({
        "a": lambda: step(padded), "b": lambda: step(packed), "b1": lambda: step(one_row), "b2": lambda: step(in_row),
        "c": lambda: step(padded, use_tga=False),
        "text": lambda: targets(model, padded)}, args.warmup, args.steps)
    median = {name: statistics.median(values) for name, values in seconds.items()}

    tokens = int(padded.attention_mask.sum())
    text = model.config.text_config
    print(f"\nmodel: LLM hidden {text.hidden_size}, {text.num_hidden_layers} layers, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, projector + LLM trainable; "
          f"alignment layers {tga.layers}")
    print(f"batch: {len(samples)} samples ({sum(s.pixel_values is None for s in samples)} text-only), "
          f"{tokens} real tokens; padded {tuple(padded.input_ids.shape)} = {padded.input_ids.numel()} "
          f"positions ({1 - tokens / padded.input_ids.numel():.0%} padding), packed "
          f"{tuple(packed.input_ids.shape)} = {packed.input_ids.numel()} positions, one row "
          f"{tuple(one_row.input_ids.shape)}; median of {args.steps} after {args.warmup} warm-up, "
          f"{args.threads} thread(s)")
    print(f"{'variant':50s} {'s/step':>8s} {'tokens/s':>10s}")
    rows = {"a": "(a) padded, TGA", "b": "(b) packed rows, TGA", "b1": "(b1) packed, one row, TGA",
            "b2": "(b2) packed rows, captions in the rows, TGA", "c": "(c) padded, LM loss only"}
    for name, label in rows.items():
        print(f"{label:50s} {median[name]:8.4f} {tokens / median[name]:10.1f}")
    print(f"ratio tokens/s packed/padded (b)/(a) = {median['a'] / median['b']:.3f}")
    print(f"ratio tokens/s one row/padded (b1)/(a) = {median['a'] / median['b1']:.3f}")
    print(f"ratio step time captions in the rows/separate text forward (b2)/(b) = {median['b2'] / median['b']:.3f}")
    print(f"ratio TGA/plain (a)/(c) = {median['a'] / median['c']:.3f}")
    print(f"TGA text forward alone: {median['text']:.4f} s = {median['text'] / median['a']:.1%} of (a)")
    print(f"load average: {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
