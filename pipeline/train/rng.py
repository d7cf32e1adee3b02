"""RNG states of every generator a training step draws from: captured per rank, restored on resume.

Dropout, augmentation and sampling draw from Python's `random`, NumPy's global generator, torch's
CPU generator and (on GPUs) one CUDA generator per device. Resuming replays the uninterrupted run
exactly only if all of them continue where they were, so a checkpoint stores each rank's states.
Generators owned by other objects (a data loader's own `torch.Generator`) travel in that object's
`state_dict()` instead.
"""
from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

_REQUIRED = ("python", "numpy", "torch")


def capture_rng_state() -> dict[str, Any]:
    """This process's generator states, as a dict that `torch.save` can write."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put every generator back to `state` (from `capture_rng_state`, possibly via a checkpoint)."""
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise ValueError(f"RNG state lacks {', '.join(missing)} (has: {', '.join(sorted(state))}); "
                         "it was not written by pipeline.train.rng.capture_rng_state")
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    saved_cuda = state.get("cuda")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # Resuming on other hardware is legal but cannot replay GPU randomness: say so, do not fail.
    if saved_cuda is None and visible:
        log.warning("checkpoint has no CUDA RNG state (saved without GPUs): CUDA generators keep "
                    "their seeds, so GPU randomness will differ from the original run")
    elif saved_cuda is not None and len(saved_cuda) != visible:
        log.warning("checkpoint has CUDA RNG states for %d devices, this process sees %d: restoring "
                    "the first %d only", len(saved_cuda), visible, min(len(saved_cuda), visible))
    if saved_cuda is not None and visible:
        for device, device_state in enumerate(saved_cuda[:visible]):
            torch.cuda.set_rng_state(device_state, device)


class RNGState:
    """This process's generators as a checkpoint state object (pipeline.train.checkpoint.Stateful)."""

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng_state(state)
