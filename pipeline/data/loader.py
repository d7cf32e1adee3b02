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
import torch
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
    # Length grouping: read this many batches' worth of samples, sort them by token count and cut
    # them into batches, so a batch holds samples of similar length (less padding). 1 = off.
    length_group_batches: int = 1
    # Padding-free packing: each micro-batch becomes one row, position ids restart per sample
    # (flash-attention varlen on GPU, a block-diagonal mask elsewhere); same samples, same loss.
    packing: bool = False

    def __post_init__(self):
        for name, lowest in {"batch_size": 1, "num_workers": 0, "length_group_batches": 1}.items():
            if getattr(self, name) < lowest:
                raise ValueError(f"{name} must be >= {lowest}, got {getattr(self, name)}")


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


def _token_count(encoded) -> int:
    return len(encoded.text.input_ids)


class ShardBatches(IterableDataset):
    """Collated batches of encoded samples from this rank's (and this worker's) shards.

    With `length_group_batches` = G > 1, G batches' worth of samples are read, ordered by length
    (stable, so the order is a function of the data) and cut into G batches. The state then names
    the start of the group and how many of its batches were yielded; a resume re-reads the group
    and skips those, which reproduces the same batches without storing any sample.
    """

    def __init__(self, shards: list[Path], *, rank: int, world_size: int, batch_size: int,
                 encode: Callable[[Any], Any], collate: Callable[[list], dict], seed: int,
                 shuffle_shards: bool = True, length_group_batches: int = 1,
                 length: Callable[[Any], int] = _token_count):
        self.shards = [Path(p) for p in shards]
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.encode, self.collate = encode, collate
        self.seed, self.shuffle_shards = seed, shuffle_shards
        self.length_group_batches, self.length = length_group_batches, length
        self.epoch = 0
        self._cursor = 0     # index into this worker's shard list (of the current group's start)
        self._offset = 0     # samples of that shard already consumed (before the group)
        self._yielded = 0    # batches of the group at (cursor, offset) already yielded
        self._resumed = False
        self._replaying = False
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
                "yielded": self._yielded, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self._cursor, self._offset = state["epoch"], state["cursor"], state["offset"]
        self._yielded = state.get("yielded", 0)
        self.skipped = dict(state.get("skipped", {}))
        self._resumed = True

    def _skip(self, reason: str, key: str, shard: Path) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        log.warning("rank %d skips sample %s of %s: %s", self.rank, key, shard.name, reason)

    def _encoded(self, shards: list[Path], cursor: int, offset: int):
        """(encoded sample, (cursor, offset) just past it) from position (cursor, offset) on."""
        while cursor < len(shards):
            shard = shards[cursor]
            for position, sample in enumerate(iter_shard(shard)):
                if position < offset:
                    continue
                encoded = self.encode(sample)
                reason = getattr(encoded, "reason", None)
                if reason is not None:
                    if not self._replaying:  # a resumed group's rejects were counted the first time
                        self._skip(reason, sample.key, shard)
                    continue
                yield encoded, (cursor, position + 1)
            cursor, offset = cursor + 1, 0

    def __iter__(self) -> Iterator[dict]:
        if not self._resumed:
            self._cursor, self._offset, self._yielded = 0, 0, 0
        self._resumed = False
        self._replaying = self._yielded > 0
        group_size = self.batch_size * self.length_group_batches
        samples = self._encoded(self.worker_shards(), self._cursor, self._offset)
        while True:
            group, end = [], None
            for encoded, end in samples:
                group.append(encoded)
                if len(group) == group_size:
                    break
            self._replaying = False
            full = len(group) // self.batch_size * self.batch_size
            if self.length_group_batches > 1:
                group[:full] = sorted(group[:full], key=self.length)  # stable: a function of the data
            batches = [group[i:i + self.batch_size] for i in range(0, full, self.batch_size)]
            for index in range(self._yielded, len(batches)):
                # The state seen with a batch resumes right after it: past the group after its
                # last batch, else at the group's start with the count of its batches done.
                if index == len(batches) - 1:
                    (self._cursor, self._offset), self._yielded = end, 0
                else:
                    self._yielded = index + 1
                yield self.collate(batches[index])
            if len(group) < group_size:  # the shards are spent
                break
        if len(group) > full:
            self.skipped["epoch_tail"] = self.skipped.get("epoch_tail", 0) + len(group) - full
            log.info("rank %d: %d samples left at the end of epoch %d (less than a batch)",
                     self.rank, len(group) - full, self.epoch)


def build_loader(shards_dir: Path, *, rank: int, world_size: int, cfg: LoaderConfig,
                 encode: Callable, collate: Callable, seed: int,
                 length: Callable[[Any], int] = _token_count) -> StatefulDataLoader:
    """`length`: the size an encoded sample is grouped by (`cfg.length_group_batches`)."""
    shards = list_shards(shards_dir)
    if len(shards) < world_size:
        raise ValueError(f"{shards_dir}: {len(shards)} shard(s) for {world_size} ranks: every rank needs "
                         "at least one (lower samples_per_shard in the retrieval_join config)")
    check_shard_count(len(shards), world_size, cfg.num_workers)
    dataset = ShardBatches(shards, rank=rank, world_size=world_size, batch_size=cfg.batch_size,
                           encode=encode, collate=collate, seed=seed,
                           shuffle_shards=cfg.shuffle_shards, length_group_batches=cfg.length_group_batches,
                           length=length)
    extra = {"prefetch_factor": cfg.prefetch_factor} if cfg.num_workers else {}
    # Its own generator: every iter() draws a worker base seed, which from torch's global generator
    # would shift the dropout masks of a resumed run (it re-creates the iterator after the restore).
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    return StatefulDataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, generator=generator, **extra)
