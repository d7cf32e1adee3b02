"""Per-step measurements: throughput, data wait, memory. Pure bookkeeping, no tracker calls."""
from __future__ import annotations

import resource
import time

import torch


class StepMeter:
    """Accumulates one optimizer step (all its micro-steps) and reports it."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_seconds = 0.0
        self.samples = 0
        self.tokens = 0
        self.parts: dict[str, float] = {}
        self.micro_steps = 0

    def data_wait(self, seconds: float) -> None:
        self.data_seconds += seconds

    def micro(self, batch: dict, parts: dict) -> None:
        self.micro_steps += 1
        self.samples += len(batch["keys"])
        mask = batch["attention_mask"]  # None for a packed (padding-free) batch
        self.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
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
        return out


def peak_memory_gb() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
