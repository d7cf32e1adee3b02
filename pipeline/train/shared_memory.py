"""Will the loader workers' batches fit in /dev/shm? The preflight's answer, before a "Bus error".

A DataLoader worker hands each batch to its rank through shared memory (/dev/shm), and holds up to
`prefetch_factor` batches ahead. Containers start with a small /dev/shm (Docker: 64 MiB), and a
worker that cannot map its next batch dies with SIGBUS ("Bus error"), the first thing most container
users meet. The estimate counts the batch's tensors at their collated size: fp32 pixels per image
(one per sample at most) and the int64 token tensors of a row as long as `prompt.max_tokens`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from transformers import AutoConfig

# input_ids, labels, position_ids or attention mask, caption inputs: int64 tensors of up to max_tokens
_TOKEN_TENSORS = 4


def batch_bytes(batch_size: int, image_size: int, max_tokens: int) -> int:
    pixels = 3 * image_size * image_size * 4
    return batch_size * (pixels + _TOKEN_TENSORS * 8 * max_tokens)


def shared_memory_warning(cfg, ranks_on_node: int, shm: Path = Path("/dev/shm"),
                          shm_bytes: int | None = None) -> str | None:
    """One line when this node's /dev/shm (`shm_bytes`: its size, read from `shm` when None) is
    smaller than what its ranks' loader workers hold (ranks × workers × prefetched batches × batch
    bytes), else None. `cfg`: a TrainConfig."""
    loader = cfg.loader
    if loader.num_workers == 0 or (shm_bytes is None and not shm.is_dir()):
        return None
    try:
        config = AutoConfig.from_pretrained(cfg.model.vision_tower)
    except (OSError, ValueError):
        return None  # the model-folder check names that problem
    image_size = getattr(getattr(config, "vision_config", config), "image_size", 0)
    per_batch = batch_bytes(loader.batch_size, image_size, cfg.prompt.max_tokens)
    need = ranks_on_node * loader.num_workers * loader.prefetch_factor * per_batch
    size = shutil.disk_usage(shm).total if shm_bytes is None else shm_bytes
    if need <= size:
        return None
    return (f"{shm} holds {_size(size)}, but {ranks_on_node} rank(s) × {loader.num_workers} loader workers × "
            f"{loader.prefetch_factor} prefetched batches of up to {_size(per_batch)} need {_size(need)}: a worker "
            f"that cannot place its next batch there dies with 'Bus error'. Give the container more (docker run "
            f"--shm-size={max(1, -(-need // 2**30))}g, or the cluster's container option), or lower "
            f"loader.num_workers / loader.prefetch_factor / loader.batch_size")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
