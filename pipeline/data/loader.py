"""Exactly-resumable training batches from WebDataset shards.

Shards are split by rank, then by data-loader worker (open_clip style); each worker reads its
shards in a per-epoch seeded order and yields whole batches, so its state is just
(epoch, shard cursor, offset in shard). torchdata's `StatefulDataLoader` carries those per-worker
states (and which worker is next) in `state_dict()`, which the checkpoint stores per rank: a
resume continues with exactly the next batch on every rank.

Ranks may run out of data at different steps (rejects, uneven shards); the training loop agrees on
the end of an epoch collectively, so no rank ever waits on a forward the others skipped.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow.parquet as pq
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from pipeline.data.shards import check_shard_count, iter_shard

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    batch_size: int = 4          # per rank, per micro-step
    num_workers: int = 2
    shuffle_shards: bool = True  # per-epoch shard order; sample order inside a shard is as written
    prefetch_factor: int = 2


def list_shards(shards_dir: Path) -> list[Path]:
    shards = sorted(Path(shards_dir).glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"{shards_dir}: no .tar shards (run the retrieval_join stage first)")
    return shards


def shard_sizes(shards_dir: Path) -> dict[str, int]:
    """Samples per shard from the manifest (no tar is opened)."""
    manifest = Path(shards_dir) / "manifest.parquet"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: missing; shards need the manifest the join writes")
    sizes: dict[str, int] = {}
    for shard in pq.read_table(manifest, columns=["shard"]).column("shard").to_pylist():
        name = Path(shard).name
        sizes[name] = sizes.get(name, 0) + 1
    return sizes


def batches_per_epoch(shards_dir: Path, world_size: int, cfg: LoaderConfig) -> int:
    """Full batches the slowest rank gets per epoch (before rejects): sizes the LR schedule."""
    sizes = shard_sizes(shards_dir)
    shards = [p.name for p in list_shards(shards_dir)]
    workers = max(cfg.num_workers, 1)
    return min(
        sum(sum(sizes.get(s, 0) for s in shards[rank::world_size][w::workers]) // cfg.batch_size
            for w in range(workers))
        for rank in range(world_size))


class ShardBatches(IterableDataset):
    """Collated batches of encoded samples from this rank's (and this worker's) shards."""

    def __init__(self, shards: list[Path], *, rank: int, world_size: int, batch_size: int,
                 encode: Callable[[Any], Any], collate: Callable[[list], dict], seed: int,
                 shuffle_shards: bool = True):
        self.shards = [Path(p) for p in shards]
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.encode, self.collate = encode, collate
        self.seed, self.shuffle_shards = seed, shuffle_shards
        self.epoch = 0
        self._cursor = 0     # index into this worker's shard list
        self._offset = 0     # samples of that shard already consumed
        self._resumed = False
        self.skipped: dict[str, int] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def worker_shards(self) -> list[Path]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order = list(self.shards[self.rank :: self.world_size][worker::workers])
        if self.shuffle_shards:
            random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}").shuffle(order)
        return order

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self._cursor, "offset": self._offset,
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self._cursor, self._offset = state["epoch"], state["cursor"], state["offset"]
        self.skipped = dict(state.get("skipped", {}))
        self._resumed = True

    def _skip(self, reason: str, key: str, shard: Path) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        log.warning("rank %d skips sample %s of %s: %s", self.rank, key, shard.name, reason)

    def __iter__(self) -> Iterator[dict]:
        if not self._resumed:
            self._cursor, self._offset = 0, 0
        self._resumed = False
        shards = self.worker_shards()
        pending: list = []
        while self._cursor < len(shards):
            shard = shards[self._cursor]
            for position, sample in enumerate(iter_shard(shard)):
                if position < self._offset:
                    continue
                encoded = self.encode(sample)
                reason = getattr(encoded, "reason", None)
                if reason is not None:
                    self._skip(reason, sample.key, shard)
                    continue
                pending.append(encoded)
                if len(pending) == self.batch_size:
                    # Batches may span shards; the state seen with a batch points just past its
                    # last sample, which is all a resume needs.
                    self._offset = position + 1
                    batch, pending = self.collate(pending), []
                    yield batch
            self._cursor, self._offset = self._cursor + 1, 0
        if pending:
            self.skipped["epoch_tail"] = self.skipped.get("epoch_tail", 0) + len(pending)
            log.info("rank %d: %d samples left at the end of epoch %d (less than a batch)",
                     self.rank, len(pending), self.epoch)


def build_loader(shards_dir: Path, *, rank: int, world_size: int, cfg: LoaderConfig,
                 encode: Callable, collate: Callable, seed: int) -> StatefulDataLoader:
    shards = list_shards(shards_dir)
    if len(shards) < world_size:
        raise ValueError(f"{shards_dir}: {len(shards)} shard(s) for {world_size} ranks: every rank needs "
                         "at least one (lower samples_per_shard in the retrieval_join config)")
    check_shard_count(len(shards), world_size, cfg.num_workers)
    dataset = ShardBatches(shards, rank=rank, world_size=world_size, batch_size=cfg.batch_size,
                           encode=encode, collate=collate, seed=seed,
                           shuffle_shards=cfg.shuffle_shards)
    extra = {"prefetch_factor": cfg.prefetch_factor} if cfg.num_workers else {}
    return StatefulDataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, **extra)
