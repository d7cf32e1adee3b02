"""Exactly-resumable training batches from WebDataset shards, one set or a weighted mixture, as a
chain of small steps in each loader worker:

    Mixture.read (pipeline/data/mixture.py: seeded draws, shard reading, a `Cursor` per sample)
    → encode_samples (the model inputs; rejects become counted skips)
    → length_grouped (pure: a group of samples → batches of similar length)
    → collate (pipeline/data/batch.py: the typed `Batch`)

`ShardBatches` runs the chain and keeps the one thing a resume needs, a `ResumePoint` (epoch, the
cursor at the start of the current length group, batches of it already yielded), whose state dict
with the skip counts is what torchdata's `StatefulDataLoader` carries per worker into the
checkpoint: a resume re-opens each set's shard at its offset and continues with exactly the next
batch on every rank.

Ranks may run out of data at different steps (rejects, uneven shards): pipeline/train/epochs.py
agrees on the end of an epoch collectively, so no rank ever waits on a forward the others skipped.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterator, Literal

import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from pipeline.conventions import Reject
from pipeline.data.batch import Batch, EncodedSample
from pipeline.data.mixture import Cursor, Mixture, Skip, split
from pipeline.data.shards import READ_TIMEOUT_S, ShardSample, check_shard_count
from pipeline.data.sources import ShardSet

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
    # A remote shard stream that sends nothing for this long is stopped (a dead server never hangs a job)
    read_timeout_s: float = READ_TIMEOUT_S
    # A shard that cannot be read to the end its manifest says: stop with its URL (raise), or count
    # its missing samples as skipped, log the URL and go on (skip)
    bad_shards: Literal["raise", "skip"] = "raise"

    def __post_init__(self):
        for name, lowest in {"batch_size": 1, "num_workers": 0, "length_group_batches": 1}.items():
            if getattr(self, name) < lowest:
                raise ValueError(f"{name} must be >= {lowest}, got {getattr(self, name)}")
        if not self.read_timeout_s > 0:
            raise ValueError(f"read_timeout_s must be > 0, got {self.read_timeout_s}")


def batches_per_epoch(sets: list[ShardSet], world_size: int, cfg: LoaderConfig) -> int:
    """Full batches the slowest rank gets per epoch (before rejects): sizes the LR schedule."""
    workers = max(cfg.num_workers, 1)
    return min(
        sum(sum(size for s in sets for _, size in split(s, rank, world_size, w, workers)) // cfg.batch_size
            for w in range(workers))
        for rank in range(world_size))


def encode_samples(drawn: Iterator[tuple[ShardSample | Skip, Cursor]],
                   encode: Callable[[ShardSample], EncodedSample | Reject],
                   rank: int) -> Iterator[tuple[EncodedSample | Skip, Cursor]]:
    """Each drawn sample as `encode` makes it (a `SampleEncoder`: an `EncodedSample`), a `Reject`
    as a skip counted by its reason."""
    for sample, cursor in drawn:
        if isinstance(sample, Skip):
            yield sample, cursor
            continue
        encoded = encode(sample)
        if isinstance(encoded, Reject):
            encoded = Skip(encoded.reason, warning=f"rank {rank} skips sample {sample.key} of {sample.dataset}: "
                                                   f"{encoded.reason}")
        yield encoded, cursor


def token_count(encoded: EncodedSample) -> int:
    return len(encoded.text.input_ids)


def length_grouped(group: list, batch_size: int, length: Callable[[Any], int] | None) -> list[list]:
    """The full batches of a group, after a stable sort by `length` (so the order is a function of
    the data; None: as read). Samples that fill no batch are left out."""
    full = len(group) // batch_size * batch_size
    kept = sorted(group[:full], key=length) if length is not None else group[:full]
    return [kept[i:i + batch_size] for i in range(0, full, batch_size)]


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where a worker's batches stand: the epoch, the cursor at the start of the current length group
    and how many of that group's batches were yielded (a resume re-reads the group and skips those,
    which reproduces the same batches without storing any sample)."""
    epoch: int
    cursor: Cursor
    yielded: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "draws": self.cursor.draws,
                "positions": [list(p) for p in self.cursor.positions], "yielded": self.yielded}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ResumePoint:
        return cls(state["epoch"], Cursor(state["draws"], tuple(tuple(p) for p in state["positions"])),
                   state["yielded"])


class ShardBatches(IterableDataset):
    """Collated batches of encoded samples drawn from this rank's (and this worker's) shards.

    With `length_group_batches` = G > 1, G batches' worth of samples are read, ordered by length and
    cut into G batches; the `ResumePoint` names the start of the group until its last batch."""

    def __init__(self, sets: list[ShardSet], *, rank: int, world_size: int, batch_size: int,
                 encode: Callable[[ShardSample], EncodedSample | Reject],
                 collate: Callable[[list[EncodedSample]], Batch], seed: int, shuffle_shards: bool = True,
                 length_group_batches: int = 1, length: Callable[[EncodedSample], int] = token_count,
                 read_timeout_s: float = READ_TIMEOUT_S, bad_shards: str = "raise"):
        self.sets = sets
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.encode, self.collate = encode, collate
        self.seed, self.shuffle_shards = seed, shuffle_shards
        self.length_group_batches, self.length = length_group_batches, length
        self.read_timeout_s, self.bad_shards = read_timeout_s, bad_shards
        self.at = ResumePoint(0, Cursor.start(len(sets)))
        self.restored = False  # load_state_dict ran since the last iteration started
        self.skipped: dict[str, int] = {}

    def set_epoch(self, epoch: int) -> None:
        self.at = dataclasses.replace(self.at, epoch=epoch)

    def state_dict(self) -> dict[str, Any]:
        return {**self.at.state_dict(), "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        at = ResumePoint.from_state_dict(state)
        if len(at.cursor.positions) != len(self.sets):
            raise ValueError(f"the checkpoint's loader read {len(at.cursor.positions)} data set(s), this config "
                             f"names {len(self.sets)}: resume with the data the run started with")
        self.at, self.restored = at, True
        self.skipped = dict(state.get("skipped", {}))

    def mixture(self) -> Mixture:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return Mixture(self.sets, seed=self.seed, epoch=self.at.epoch, rank=self.rank, world_size=self.world_size,
                       worker=worker, workers=workers, shuffle_shards=self.shuffle_shards,
                       read_timeout_s=self.read_timeout_s, bad_shards=self.bad_shards)

    def __iter__(self) -> Iterator[Batch]:
        if not self.restored:
            self.at = ResumePoint(self.at.epoch, Cursor.start(len(self.sets)))
        self.restored = False
        drawn = encode_samples(self.mixture().read(self.at.cursor), self.encode, self.rank)
        # a resumed group was read before the checkpoint: its skips are in the restored counts
        replaying = self.at.yielded > 0
        group_size = self.batch_size * self.length_group_batches
        while True:
            group, end = self._read_group(drawn, group_size, count=not replaying)
            replaying = False
            batches = length_grouped(group, self.batch_size, self.length if self.length_group_batches > 1 else None)
            for index in range(self.at.yielded, len(batches)):
                # The state seen with a batch resumes right after it: past the group after its
                # last batch, else at the group's start with the count of its batches done.
                last = index == len(batches) - 1
                self.at = ResumePoint(self.at.epoch, end) if last else dataclasses.replace(self.at, yielded=index + 1)
                yield self.collate(batches[index])
            if len(group) < group_size:  # the shards are spent
                break
        tail = len(group) - len(batches) * self.batch_size
        if tail:
            self._count(Skip("epoch_tail", tail))
            log.info("rank %d: %d samples left at the end of epoch %d (less than a batch)", self.rank, tail,
                     self.at.epoch)

    def _read_group(self, drawn: Iterator[tuple[EncodedSample | Skip, Cursor]], size: int,
                    count: bool) -> tuple[list[EncodedSample], Cursor | None]:
        """Up to `size` encoded samples and the cursor past the last; the skips on the way are
        counted when `count`."""
        group, end = [], None
        for item, cursor in drawn:
            if isinstance(item, Skip):
                if count:
                    self._count(item)
                continue
            group.append(item)
            end = cursor
            if len(group) == size:
                break
        return group, end

    def _count(self, skip: Skip) -> None:
        self.skipped[skip.reason] = self.skipped.get(skip.reason, 0) + skip.count
        if skip.warning:
            log.warning("%s", skip.warning)


def build_loader(sets: list[ShardSet], *, rank: int, world_size: int, cfg: LoaderConfig,
                 encode: Callable[[ShardSample], EncodedSample | Reject],
                 collate: Callable[[list[EncodedSample]], Batch], seed: int,
                 length: Callable[[EncodedSample], int] = token_count) -> StatefulDataLoader:
    """`sets`: resolved shard sets (pipeline.data.sources.resolve); `length`: the size an encoded
    sample is grouped by (`cfg.length_group_batches`)."""
    check_readers(sets, world_size, cfg.num_workers)
    dataset = ShardBatches(sets, rank=rank, world_size=world_size, batch_size=cfg.batch_size,
                           encode=encode, collate=collate, seed=seed,
                           shuffle_shards=cfg.shuffle_shards, length_group_batches=cfg.length_group_batches,
                           length=length, read_timeout_s=cfg.read_timeout_s, bad_shards=cfg.bad_shards)
    extra = {"prefetch_factor": cfg.prefetch_factor} if cfg.num_workers else {}
    # Its own generator: every iter() draws a worker base seed, which from torch's global generator
    # would shift the dropout masks of a resumed run (it re-creates the iterator after the restore).
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    return StatefulDataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, generator=generator, **extra)


def check_readers(sets: list[ShardSet], world_size: int, workers: int) -> list[str]:
    """Refuses a world with a rank that has no shard at all; warns (and returns the messages) for
    readers that get no shard of some set (their draws renormalise over the sets they have)."""
    if sum(len(s.urls) for s in sets) < world_size and len(sets) == 1:
        raise ValueError(f"{sets[0].name}: {len(sets[0].urls)} shard(s) for {world_size} ranks: every rank "
                         "needs at least one (lower samples_per_shard in the retrieval_join config)")
    for rank in range(world_size):
        if not any(split(s, rank, world_size, 0, 1) for s in sets):
            raise ValueError(f"rank {rank} of {world_size} gets no shard of any data set: write more shards "
                             "(lower samples_per_shard in the retrieval_join config)")
    messages = []
    for s in sets:
        message = check_shard_count(len(s.urls), world_size, workers,
                                    what=s.name if len(sets) > 1 else None)
        if message:
            messages.append(message)
    return messages
