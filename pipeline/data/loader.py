"""Exactly-resumable training batches from WebDataset shards, one set or a weighted mixture.

Every shard set (pipeline.data.sources) is split by rank, then by data-loader worker (open_clip
style). A worker draws its samples: draw k picks a set with probability proportional to its weight
(a seeded function of seed/epoch/rank/worker/k, so a draw needs no stored generator), then takes that
set's next sample; a set runs through its shards in a per-epoch seeded order and starts another
pass (a new order) when a weight asks for more of it than it holds. An epoch is as many draws as the
worker's shards hold samples together, so one set alone reads each of its samples exactly once, in
the order it always had. The state is (epoch, draws, per set: pass, shard cursor, offset);
torchdata's `StatefulDataLoader` carries those per-worker states (and which worker is next) in
`state_dict()`, which the checkpoint stores per rank: a resume re-opens each set's shard, skips to
the offset, and continues with exactly the next batch on every rank.

Every manifest position is one draw, read or not: a shard that fails or ends early (with
`bad_shards: skip`) gives up its remaining positions as counted, logged skips, so the epoch never
silently shrinks and never reads a sample twice.

Ranks may run out of data at different steps (rejects, uneven shards); the training loop agrees on
the end of an epoch collectively, so no rank ever waits on a forward the others skipped.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from pipeline.data.shards import READ_TIMEOUT_S, ShardFormatError, ShardReadError, check_shard_count, iter_shard
from pipeline.data.sources import ShardSet

log = logging.getLogger(__name__)
DRAW_BLOCK = 4096  # draws per seeded block of uniforms


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


def split(shard_set: ShardSet, rank: int, world_size: int, worker: int, workers: int) -> list[tuple[str, int]]:
    """This reader's (url, samples) of a set: by rank, then by worker."""
    pairs = list(zip(shard_set.urls, shard_set.sizes))
    return pairs[rank::world_size][worker::workers]


def batches_per_epoch(sets: list[ShardSet], world_size: int, cfg: LoaderConfig) -> int:
    """Full batches the slowest rank gets per epoch (before rejects): sizes the LR schedule."""
    workers = max(cfg.num_workers, 1)
    return min(
        sum(sum(size for s in sets for _, size in split(s, rank, world_size, w, workers)) // cfg.batch_size
            for w in range(workers))
        for rank in range(world_size))


def _token_count(encoded) -> int:
    return len(encoded.text.input_ids)


class ShardBatches(IterableDataset):
    """Collated batches of encoded samples drawn from this rank's (and this worker's) shards.

    With `length_group_batches` = G > 1, G batches' worth of samples are read, ordered by length
    (stable, so the order is a function of the data) and cut into G batches. The state then names
    the start of the group and how many of its batches were yielded; a resume re-reads the group
    and skips those, which reproduces the same batches without storing any sample.
    """

    def __init__(self, sets: list[ShardSet], *, rank: int, world_size: int, batch_size: int,
                 encode: Callable[[Any], Any], collate: Callable[[list], dict], seed: int,
                 shuffle_shards: bool = True, length_group_batches: int = 1,
                 length: Callable[[Any], int] = _token_count, read_timeout_s: float = READ_TIMEOUT_S,
                 bad_shards: str = "raise"):
        self.sets = sets
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.encode, self.collate = encode, collate
        self.seed, self.shuffle_shards = seed, shuffle_shards
        self.length_group_batches, self.length = length_group_batches, length
        self.read_timeout_s, self.bad_shards = read_timeout_s, bad_shards
        self.epoch = 0
        self._draws = 0      # draws done before the current group
        self._positions = self._start()  # per set (pass, shard cursor, offset) before the group
        self._yielded = 0    # batches of the group at that position already yielded
        self._resumed = False
        self._replaying = False
        self.skipped: dict[str, int] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _start(self) -> list[tuple[int, int, int]]:
        return [(0, 0, 0)] * len(self.sets)

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def worker_shards(self, index: int = 0, pass_: int = 0) -> list[tuple[str, int]]:
        """(url, samples) of set `index` in this worker's order for this epoch and pass."""
        worker, workers = self._worker()
        order = split(self.sets[index], self.rank, self.world_size, worker, workers)
        if self.shuffle_shards:
            salt = f"/{index}/{pass_}" if len(self.sets) > 1 or pass_ else ""  # one set: the order it always had
            random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}{salt}").shuffle(order)
        return order

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "draws": self._draws, "positions": [list(p) for p in self._positions],
                "yielded": self._yielded, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self._draws, self._yielded = state["epoch"], state["draws"], state["yielded"]
        self._positions = [tuple(p) for p in state["positions"]]
        if len(self._positions) != len(self.sets):
            raise ValueError(f"the checkpoint's loader read {len(self._positions)} data set(s), this config "
                             f"names {len(self.sets)}: resume with the data the run started with")
        self.skipped = dict(state.get("skipped", {}))
        self._resumed = True

    def _count(self, reason: str, n: int = 1) -> None:
        if not self._replaying:  # a resumed group's skips were counted the first time
            self.skipped[reason] = self.skipped.get(reason, 0) + n

    # -- drawing ------------------------------------------------------------------------------------

    def _chooser(self) -> Callable[[int], int]:
        """Draw k → the index of the set it reads from (weights renormalised over the sets this
        worker has shards of)."""
        worker, workers = self._worker()
        weights = np.array([float(s.weight) if split(s, self.rank, self.world_size, worker, workers) else 0.0
                            for s in self.sets])
        live = np.flatnonzero(weights)
        if len(live) <= 1:
            only = int(live[0]) if len(live) else 0
            return lambda k: only
        edges = np.cumsum(weights)
        edges /= edges[-1]  # exactly 1.0 at the end: a uniform in [0, 1) always lands on a set
        block: dict[int, np.ndarray] = {}

        def choose(k: int) -> int:
            b = k // DRAW_BLOCK
            if b not in block:
                block.clear()
                block[b] = np.random.default_rng([self.seed, self.epoch, self.rank, worker, b]).random(DRAW_BLOCK)
            return int(np.searchsorted(edges, block[b][k % DRAW_BLOCK], side="right"))
        return choose

    def _epoch_draws(self) -> int:
        worker, workers = self._worker()
        return sum(size for s in self.sets for _, size in split(s, self.rank, self.world_size, worker, workers))

    def _set_samples(self, index: int, position: tuple[int, int, int]):
        """(sample or None, position after it) of one set from `position` on, pass after pass. None:
        a manifest position whose sample could not be read (a skipped bad shard)."""
        pass_, cursor, offset = position
        while True:
            order = self.worker_shards(index, pass_)
            while cursor < len(order):
                url, size = order[cursor]
                for at, sample in self._shard(url, size, offset):
                    after = (pass_, cursor, at + 1) if at + 1 < size else (pass_, cursor + 1, 0)
                    yield sample, after
                cursor, offset = cursor + 1, 0
            pass_, cursor = pass_ + 1, 0

    def _shard(self, url: str, size: int, offset: int) -> Iterator[tuple[int, Any]]:
        """(position, sample) for positions offset..size-1 of one shard; with bad_shards=skip the
        positions it could not deliver come as (position, None), counted and logged."""
        read, failure = 0, None
        try:
            for at, sample in enumerate(iter_shard(url, self.read_timeout_s)):
                if at >= size:
                    raise ShardFormatError(f"{url}: holds more samples than the {size} its manifest lists "
                                           "(a stale manifest: re-run the retrieval join)")
                read = at + 1
                if at >= offset:
                    yield at, sample
        except (ShardReadError, ShardFormatError) as err:
            if self.bad_shards == "raise":
                raise
            failure = str(err)
        if read < size and failure is None:
            failure = f"{url}: ended after {read} samples, its manifest lists {size} (cut short?)"
            if self.bad_shards == "raise":
                raise ShardReadError(failure)
        if failure is not None:
            lost = size - max(read, offset)
            self._count("bad_shard_samples", lost)
            self._count("bad_shards")
            if not self._replaying:
                log.warning("rank %d skips %d sample(s) of a bad shard: %s", self.rank, lost, failure)
            for at in range(max(read, offset), size):
                yield at, None

    def _encoded(self, draws: int, positions: list[tuple[int, int, int]]):
        """(encoded sample, (draws, positions) just past it) from that point to the epoch's end."""
        choose, total = self._chooser(), self._epoch_draws()
        positions = list(positions)
        streams = [self._set_samples(i, positions[i]) for i in range(len(self.sets))]
        while draws < total:
            index = choose(draws)
            sample, positions[index] = next(streams[index])
            draws += 1
            if sample is None:
                continue
            encoded = self.encode(sample._replace(dataset=self.sets[index].name))
            reason = getattr(encoded, "reason", None)
            if reason is not None:
                self._count(reason)
                if not self._replaying:
                    log.warning("rank %d skips sample %s of %s: %s", self.rank, sample.key,
                                self.sets[index].name, reason)
                continue
            yield encoded, (draws, list(positions))

    def __iter__(self) -> Iterator[dict]:
        if not self._resumed:
            self._draws, self._positions, self._yielded = 0, self._start(), 0
        self._resumed = False
        self._replaying = self._yielded > 0
        group_size = self.batch_size * self.length_group_batches
        samples = self._encoded(self._draws, self._positions)
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
                    (self._draws, self._positions), self._yielded = end, 0
                else:
                    self._yielded = index + 1
                yield self.collate(batches[index])
            if len(group) < group_size:  # the shards are spent
                break
        if len(group) > full:
            self.skipped["epoch_tail"] = self.skipped.get("epoch_tail", 0) + len(group) - full
            log.info("rank %d: %d samples left at the end of epoch %d (less than a batch)",
                     self.rank, len(group) - full, self.epoch)


def build_loader(sets: list[ShardSet], *, rank: int, world_size: int, cfg: LoaderConfig,
                 encode: Callable, collate: Callable, seed: int,
                 length: Callable[[Any], int] = _token_count) -> StatefulDataLoader:
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
