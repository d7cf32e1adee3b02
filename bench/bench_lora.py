"""LoRA vs full stage 2: step time, optimizer state and checkpoint size, measured in one run.

    PYTHONPATH=. .venv/bin/python bench/bench_lora.py [--quick] [--world DIR] [--batch 8]
        [--steps 10] [--warmup 2] [--threads 1] [--rank 128] [--hidden 256 --layers 8]

One process builds the tiny world's Llava (or one with a larger random Llama LLM: --hidden/--layers)
twice: (full) projector + LLM trainable, stage 2's default; (lora) projector + LoRA adapters of
`--rank` on every LLM linear (pipeline.model.lora, LLaVA's recipe), LLM frozen. Both train on the
same micro-batch of real stage-2 samples with TGA (the caption forward each step, as stage 2 runs)
and AdamW; every timed step is forward + backward + optimizer step, round-robin, medians.

Optimizer state: the bytes of AdamW's moments after a step. Checkpoint: the bytes `torch.save`
writes for what a checkpoint of that run must hold (trainable weights in fp32 and the optimizer
state; the LoRA checkpoint leaves the frozen LLM out, as pipeline.train.checkpoint does with
DeepSpeed's exclude_frozen_parameters). Under ZeRO-3 both are split over ranks; the ratio is the same.
"""
from __future__ import annotations

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
from bench_stage2_throughput import TINY_CONFIG, stage2_samples  # noqa: E402  (sibling scripts)
from bench_tga_overhead import benchmark_arguments, llm_for, time_round_robin, tiny_world  # noqa: E402
from pipeline.data.batch import collate  # noqa: E402
from pipeline.model.assemble import ModelConfig, apply_freeze, build_llava  # noqa: E402
from pipeline.model.lora import LoraConfig, add_lora, trainable_parameters  # noqa: E402
from pipeline.tga.loss import TGAConfig  # noqa: E402
from pipeline.train.step import CaptionTargets, tga_forward  # noqa: E402


def build(llm: Path, world, lora: LoraConfig | None):
    torch.manual_seed(0)
    assembled = build_llava(ModelConfig(llm=llm, vision_tower=world.clip, dtype="fp32", attn_implementation="sdpa"))
    if lora is not None:
        add_lora(assembled.model, lora)
    apply_freeze(assembled.model, ["projector"] if lora else ["projector", "llm"], lora=lora is not None)
    assembled.model.train()
    return assembled


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values()
                        if isinstance(v, torch.Tensor) and v.dim() > 0)


def checkpoint_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> int:
    path = folder / "checkpoint.pt"
    torch.save({"trainable": {n: p.detach().float() for n, p in model.named_parameters() if p.requires_grad},
                "optimizer": optimizer.state_dict()}, path)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_arguments(__doc__.split("\n")[0], batch=8, steps=10, warmup=2)
    parser.add_argument("--rank", type=int, default=128, help="LoRA rank (alpha = 2 x rank; 16 with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.steps, args.rank = 1, 3, 16
    torch.set_num_threads(args.threads)
    transformers_logging.set_verbosity_error()
    load_start = os.getloadavg()[0]
    world = tiny_world(args.world)
    raw = yaml.safe_load(TINY_CONFIG.read_text())
    tga = TGAConfig(**raw["tga"])
    lora = LoraConfig(rank=args.rank, alpha=2 * args.rank, dropout=0.05)
    with tempfile.TemporaryDirectory() as tmp:
        llm, tga = llm_for(world, tga, args.hidden, args.layers, Path(tmp))
        variants = {"full": build(llm, world, None), "lora": build(llm, world, lora)}
        samples = stage2_samples(world, variants["full"], raw["prompt"], args.batch)
        batch = collate(samples, variants["full"].tokenizer.pad_token_id)
        optimizers = {name: torch.optim.AdamW([p for p in v.model.parameters() if p.requires_grad], lr=1e-6)
                      for name, v in variants.items()}
        targets = CaptionTargets(tga.layers, cached=False)  # the LLM (or its adapters) trains

        def step(name: str) -> None:
            optimizers[name].zero_grad(set_to_none=True)
            loss, _ = tga_forward(variants[name].model, batch, targets, 0.0, tga)
            loss.backward()
            optimizers[name].step()

        seconds = time_round_robin({name: (lambda n=name: step(n)) for name in variants}, args.warmup, args.steps)
        median = {name: statistics.median(values) for name, values in seconds.items()}
        sizes = {name: (trainable_parameters(v.model), optimizer_bytes(optimizers[name]),
                        checkpoint_bytes(v.model, optimizers[name], Path(tmp)))
                 for name, v in variants.items()}
    text = variants["full"].model.config.text_config
    total = sum(p.numel() for p in variants["full"].model.parameters())
    print(f"\nmodel: LLM hidden {text.hidden_size}, {text.num_hidden_layers} layers, {total / 1e6:.2f} M params; "
          f"LoRA rank {lora.rank} on {', '.join(lora.target_modules)}; batch {len(samples)} stage-2 samples; "
          f"median of {args.steps} after {args.warmup} warm-up, {args.threads} thread(s)")
    print(f"{'variant':8s} {'s/step':>8s} {'trainable':>12s} {'optimizer MB':>13s} {'checkpoint MB':>14s}")
    for name in variants:
        params, optim, ckpt = sizes[name]
        print(f"{name:8s} {median[name]:8.4f} {params:12,d} {optim / 2**20:13.2f} {ckpt / 2**20:14.2f}")
    print(f"ratio step time lora/full = {median['lora'] / median['full']:.3f}")
    print(f"ratio optimizer state lora/full = {sizes['lora'][1] / sizes['full'][1]:.4f}")
    print(f"ratio checkpoint lora/full = {sizes['lora'][2] / sizes['full'][2]:.4f}")
    print(f"load average: {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
