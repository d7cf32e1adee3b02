"""Per-step measurements: throughput, data wait, memory, the loss parts. No tracker calls."""
from __future__ import annotations

import resource
import time

import torch

from pipeline.tga.prompt import IGNORE_INDEX
from pipeline.train.distributed import sum_over_ranks

COSINE = "cos_layer/"  # per-layer cos(i, t) of the TGA loss, a mean over valid samples
RATES = ("samples_per_second", "tokens_per_second")  # per-rank rates add up to the job's


def batch_flops(flops, batch, caption_forward_ran: bool) -> float:
    """Model FLOPs of one micro-step on `batch` (pipeline.train.flops.StepFlops.step): caption
    segments of packed rows go through the whole step; a separate caption forward counts when it ran."""
    seq_lens = batch.seq_lens.tolist()
    images = 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
    captions = [n for n in batch.caption_lens.tolist() if n]
    if batch.caption_rows is not None:
        seq_lens, captions = seq_lens + captions, []
    elif not caption_forward_ran:
        captions = []
    logits = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())  # the LM head's positions
    return flops.step(seq_lens, images, captions, logit_positions=logits)


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
        self.cosine_sums: dict[str, float] = {}  # cos_layer/<l> x n_valid, summed over micro-steps
        self.valid_samples = 0.0
        self.micro_steps = 0
        self.model_flops = 0.0

    def timed(self, fetch):
        """`fetch` (the next batch), its time counted as waiting for data."""
        def timed_fetch():
            started = time.perf_counter()
            try:
                return fetch()
            finally:
                self.data_seconds += time.perf_counter() - started
        return timed_fetch

    def micro(self, batch, parts: dict, caption_forward_ran: bool = False) -> None:
        """`batch`: a pipeline.data.batch.Batch as the loader made it (on the host: its lengths are
        read here); `parts`: the loss parts as tensors on the device, summed as tensors (in float64,
        as Python floats were) and read once per logged step, so a micro-step never waits for the
        device; `caption_forward_ran`: the TGA text-side forward ran for it (not served from cache)."""
        self.micro_steps += 1
        self.samples += len(batch)
        self.tokens += int(batch.seq_lens.sum())
        if self.flops is not None:
            self.model_flops += batch_flops(self.flops, batch, caption_forward_ran)
        valid = torch.as_tensor(parts.get("n_valid", 0.0)).detach().double()
        self.valid_samples = self.valid_samples + valid
        for name, value in parts.items():
            value = torch.as_tensor(value).detach().double()
            if name.startswith(COSINE):
                self.cosine_sums[name] = self.cosine_sums.get(name, 0.0) + value * valid
            else:
                self.parts[name] = self.parts.get(name, 0.0) + value

    def _read(self) -> tuple[dict[str, float], dict[str, float], float]:
        """The accumulated tensors as numbers, with one device-to-host copy for the whole step."""
        tensors = [*self.parts.values(), *self.cosine_sums.values(), self.valid_samples]
        device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), None)
        numbers = torch.stack([torch.as_tensor(t, dtype=torch.float64, device=device).reshape(())
                               for t in tensors]).tolist()
        parts = dict(zip(self.parts, numbers))
        cosine_sums = dict(zip(self.cosine_sums, numbers[len(parts):]))
        return parts, cosine_sums, numbers[-1]

    def report(self) -> dict[str, float]:
        return self._report(*self._read())

    def _report(self, parts: dict[str, float], cosine_sums: dict[str, float], valid_samples: float) -> dict[str, float]:
        seconds = time.perf_counter() - self.start
        out = {name: value / max(self.micro_steps, 1) for name, value in parts.items()}
        out.update({name: total / valid_samples if valid_samples else 0.0 for name, total in cosine_sums.items()})
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

    def report_over_ranks(self, world: int) -> dict[str, float]:
        """The step for the whole job (a collective): rates summed over ranks, cos_layer/<l> the
        mean over every rank's valid samples (a rank with none must not pull it towards 0), every
        other value the mean of the ranks' values."""
        parts, cosine_sums, valid_samples = self._read()  # one device-to-host copy for both uses
        local = {name: value for name, value in self._report(parts, cosine_sums, valid_samples).items()
                 if not name.startswith(COSINE)}
        weighted = {f"{COSINE}sum/{name[len(COSINE):]}": total for name, total in cosine_sums.items()}
        summed = sum_over_ranks({**local, **weighted, "valid_samples": valid_samples})
        out = {name: summed[name] if name in RATES else summed[name] / world for name in local}
        for name in cosine_sums:
            total = summed[f"{COSINE}sum/{name[len(COSINE):]}"]
            out[name] = total / summed["valid_samples"] if summed["valid_samples"] else 0.0
        return out


class DatasetCounts:
    """Samples trained per data set on this rank since the run began (a per-rank checkpoint state
    object, so the counts continue across a resume); `report_over_ranks` gives the job's."""

    def __init__(self, names: list[str]):
        self.counts = dict.fromkeys(names, 0)

    def add(self, batch) -> None:
        for name in batch.datasets:
            self.counts[name] += 1

    def state_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.counts.update(state)

    def report_over_ranks(self) -> dict[str, float]:
        """`data/<name>/samples` (all ranks) and `data/<name>/share` of all samples (a collective)."""
        summed = sum_over_ranks({name: float(count) for name, count in self.counts.items()})
        total = sum(summed.values()) or 1.0
        out = {f"data/{name}/samples": value for name, value in summed.items()}
        out.update({f"data/{name}/share": value / total for name, value in summed.items()})
        return out


def step_line(stage: str, step: int, total: int, metrics: dict[str, float], elapsed_seconds: float,
              steps_done: int) -> str:
    """One progress line for a log file: step/total, loss parts, lr, throughput, data wait, ETA, memory.
    `steps_done`: optimizer steps this process has run in `elapsed_seconds` (a resume starts at 0)."""
    parts = " ".join(f"{name} {metrics[name]:.4f}" for name in ("lm", "align", "pair") if name in metrics)
    eta = elapsed_seconds / max(steps_done, 1) * (total - step)
    return (f"[{stage}] step {step}/{total} {parts} lr {metrics.get('lr', 0.0):.3g} | "
            f"{metrics.get('samples_per_second', 0.0):.1f} samples/s {metrics.get('tokens_per_second', 0.0):.0f} "
            f"tokens/s data {metrics.get('data_wait_fraction', 0.0):.0%} | ETA {_duration(eta)} | "
            f"peak {metrics.get('peak_memory_gb', 0.0):.1f} GB")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def peak_memory_gb() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
