"""The GPU check's LoRA run (bench/gpu_check.py --lora): configs/stage2_lora.yaml on the check's model
folders, as pipeline.train.job builds it (adapters added before the freeze, inside ZeRO-3), then
optimizer steps on one packed micro-batch. It holds when the engine initialises, every loss is
finite and the steps change the loss (the adapters and the projector train)."""
from __future__ import annotations

import dataclasses
import gc
import math
import time
from pathlib import Path

import torch

from bench.gpu_check_world import Sizes, encode, stage_config

LORA_CONFIG, LORA_STEPS = "configs/stage2_lora.yaml", 2


def run_lora(args, sizes: Sizes, records: list[dict], tmp: Path, attention: str) -> bool:
    from pipeline.data.batch import collate
    from pipeline.model.assemble import apply_freeze, build_llava, packs_one_row
    from pipeline.model.lora import add_lora, is_lora_parameter
    from pipeline.train import engine as ds_engine
    from pipeline.train.step import CaptionTargets, tga_forward

    phase = time.perf_counter()
    # grad_accum 1: each engine step is an optimizer step
    cfg = stage_config("stage2", args, sizes, tmp, attention, config=LORA_CONFIG)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_accum=1))
    ds = ds_engine.deepspeed_config(cfg, args.device)
    zero3 = ds_engine.zero3_context(ds)  # noqa: F841 — alive while loading: from_pretrained into partitions
    assembled = build_llava(cfg.model, args.device)
    add_lora(assembled.model, cfg.lora)
    tensors = apply_freeze(assembled.model, cfg.trainable, lora=True)
    engine, _, _ = ds_engine.initialize(assembled.model, cfg, ds, LORA_STEPS, args.device)
    numel = {n: (getattr(p, "ds_numel", p.numel()), p) for n, p in engine.module.named_parameters()}
    adapters = sorted({str(p.dtype).removeprefix("torch.") for n, (_, p) in numel.items() if is_lora_parameter(n)})
    trains = sum(count for count, p in numel.values() if p.requires_grad) / 1e6
    total = sum(count for count, _ in numel.values()) / 1e6
    print(f"\n== LoRA: {LORA_CONFIG}; rank {cfg.lora.rank}, alpha {cfg.lora.alpha} on "
          f"{', '.join(cfg.lora.target_modules)}; trains {' + '.join(cfg.trainable)} + adapters: {trains:.4g} M of "
          f"{total:.4g} M parameters ({len(tensors)} tensors); adapters in {', '.join(adapters)}; engine built in "
          f"{time.perf_counter() - phase:.0f} s")
    samples = encode(assembled, cfg, records, "stage2")
    batch = collate(samples, assembled.tokenizer.pad_token_id, packed=cfg.loader.packing,
                    single_row=packs_one_row(attention)).to(engine.device)
    targets, losses = CaptionTargets(cfg.tga.layers, cached=False), []
    for step in range(LORA_STEPS):
        started = time.perf_counter()
        loss, parts = tga_forward(engine, batch, targets, step / LORA_STEPS, cfg.tga)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        print(f"  step {step + 1}: loss {losses[-1]:.6f} (lm {float(parts['lm']):.6f}, align "
              f"{float(parts['align']):.6f}, pair {float(parts['pair']):.6f}), {time.perf_counter() - started:.2f} s")
    finite, moved = all(map(math.isfinite, losses)), losses[-1] != losses[0]
    print(f"  losses finite: {'yes' if finite else 'NO'}; the steps changed the loss: {'yes' if moved else 'NO'}")
    engine.destroy()
    del engine, assembled, zero3
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return finite and moved
