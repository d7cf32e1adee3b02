"""Per-step measurements: throughput, data wait, memory. Pure bookkeeping, no tracker calls."""
from __future__ import annotations

import resource
import time

import torch


class StepMeter:
    """Accumulates one optimizer step (all its micro-steps) and reports it.

    With `flops` (pipeline.train.flops.StepFlops) it also reports the model TFLOP/s of this rank,
    and with a device peak (FLOP/s) the MFU.
    """

    def __init__(self, flops=None, peak_flops: float | None = None):
        self.flops, self.peak_flops = flops, peak_flops
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_seconds = 0.0
        self.samples = 0
        self.tokens = 0
        self.parts: dict[str, float] = {}
        self.micro_steps = 0
        self.model_flops = 0.0

    def data_wait(self, seconds: float) -> None:
        self.data_seconds += seconds

    def micro(self, batch: dict, parts: dict, caption_forward: bool = False) -> None:
        """`caption_forward`: the TGA text-side forward ran for this batch (not served from cache)."""
        self.micro_steps += 1
        self.samples += len(batch["keys"])
        mask = batch["attention_mask"]  # None for a packed (padding-free) batch
        seq_lens = batch["seq_lens"].tolist() if mask is None else mask.sum(dim=1).tolist()
        self.tokens += sum(seq_lens)
        if self.flops is not None:
            images = 0 if batch.get("pixel_values") is None else batch["pixel_values"].shape[0]
            captions = batch["caption_attention_mask"].sum(dim=1).tolist() if caption_forward else []
            self.model_flops += self.flops.step(seq_lens, images, captions)
        for name, value in parts.items():
            self.parts[name] = self.parts.get(name, 0.0) + float(value)

    def report(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.start
        out = {name: value / max(self.micro_steps, 1) for name, value in self.parts.items()}
        out.update({
            "step_seconds": seconds,
            "data_wait_fraction": self.data_seconds / seconds if seconds > 0 else 0.0,
            "samples_per_second": self.samples / seconds if seconds > 0 else 0.0,
            "tokens_per_second": self.tokens / seconds if seconds > 0 else 0.0,
            "peak_memory_gb": peak_memory_gb(),
        })
        if self.flops is not None and seconds > 0:
            out["model_tflops_per_second"] = self.model_flops / seconds / 1e12  # this rank
            if self.peak_flops:
                out["mfu"] = self.model_flops / seconds / self.peak_flops
        return out


def peak_memory_gb() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
