"""Which sample a loader worker reads next: seeded draws over the shard sets of a mixture, and the
cursor that says where they stand.

Every shard set (pipeline.data.sources) is split by rank, then by data-loader worker (open_clip
style). Draw k picks a set with probability proportional to its weight (a seeded function of
seed/epoch/rank/worker/k, so a draw needs no stored generator), then takes that set's next sample; a
set runs through its shards in a per-epoch seeded order and starts another pass (a new order) when a
weight asks for more of it than it holds. An epoch is as many draws as the worker's shards hold
samples together, so one set alone reads each of its samples exactly once, in the order it always
had. A `Cursor` (draws done; per set: pass, shard, offset) is all a resume needs: reading from it
re-opens each set's shard at the offset.

Every manifest position is one draw, read or not: a shard that fails or ends early (with
`bad_shards: skip`) gives up its remaining positions as a counted, logged `Skip`, so the epoch never
silently shrinks and never reads a sample twice.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Callable, Iterator

import numpy as np

from pipeline.data.shards import READ_TIMEOUT_S, ShardFormatError, ShardReadError, ShardSample, iter_shard
from pipeline.data.sources import ShardSet

DRAW_BLOCK = 4096  # draws per seeded block of uniforms
Position = tuple[int, int, int]  # of one set: (pass, shard index in that pass's order, offset in the shard)


@dataclasses.dataclass(frozen=True)
class Cursor:
    draws: int                       # draws done in this epoch
    positions: tuple[Position, ...]  # per set: where its next sample is

    @classmethod
    def start(cls, sets: int) -> Cursor:
        return cls(0, ((0, 0, 0),) * sets)


@dataclasses.dataclass(frozen=True)
class Skip:
    """Draws that give no sample, counted by reason in the loader's `skipped` and logged once."""
    reason: str
    count: int = 1
    warning: str = ""  # logged when counted


def split(shard_set: ShardSet, rank: int, world_size: int, worker: int, workers: int) -> list[tuple[str, int]]:
    """This reader's (url, samples) of a set: by rank, then by worker."""
    pairs = list(zip(shard_set.urls, shard_set.sizes))
    return pairs[rank::world_size][worker::workers]


@dataclasses.dataclass(frozen=True)
class Mixture:
    """One reader's (rank's, worker's) draws in one epoch."""
    sets: list[ShardSet]
    seed: int
    epoch: int
    rank: int
    world_size: int
    worker: int = 0
    workers: int = 1
    shuffle_shards: bool = True
    read_timeout_s: float = READ_TIMEOUT_S
    bad_shards: str = "raise"

    def shards(self, index: int) -> list[tuple[str, int]]:
        return split(self.sets[index], self.rank, self.world_size, self.worker, self.workers)

    def shard_order(self, index: int, pass_: int) -> list[tuple[str, int]]:
        """(url, samples) of set `index` in this reader's order for this epoch and pass."""
        order = self.shards(index)
        if self.shuffle_shards:
            salt = f"/{index}/{pass_}" if len(self.sets) > 1 or pass_ else ""  # one set: the order it always had
            random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{self.worker}{salt}").shuffle(order)
        return order

    def draws_per_epoch(self) -> int:
        return sum(size for index in range(len(self.sets)) for _, size in self.shards(index))

    def read(self, cursor: Cursor) -> Iterator[tuple[ShardSample | Skip, Cursor]]:
        """From `cursor` to the epoch's end: each drawn sample (its `dataset` set) with the cursor
        just past it, and the skips on the way (with the cursor where they were found)."""
        choose, total = self._chooser(), self.draws_per_epoch()
        draws, positions = cursor.draws, list(cursor.positions)
        streams = [self._set_samples(i, positions[i]) for i in range(len(self.sets))]
        while draws < total:
            index = choose(draws)
            item = next(streams[index])
            while isinstance(item, Skip):
                yield item, Cursor(draws, tuple(positions))
                item = next(streams[index])
            sample, positions[index] = item
            draws += 1
            if sample is not None:
                yield sample._replace(dataset=self.sets[index].name), Cursor(draws, tuple(positions))

    def _chooser(self) -> Callable[[int], int]:
        """Draw k → the index of the set it reads from (weights renormalised over the sets this
        reader has shards of)."""
        weights = np.array([float(s.weight) if self.shards(i) else 0.0 for i, s in enumerate(self.sets)])
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
                block[b] = np.random.default_rng([self.seed, self.epoch, self.rank, self.worker, b]).random(DRAW_BLOCK)
            return int(np.searchsorted(edges, block[b][k % DRAW_BLOCK], side="right"))
        return choose

    def _set_samples(self, index: int, position: Position):
        """(sample or None, position after it) of one set from `position` on, pass after pass, and
        the skips on the way. None: a manifest position a bad shard could not deliver."""
        pass_, cursor, offset = position
        while True:
            order = self.shard_order(index, pass_)
            while cursor < len(order):
                url, size = order[cursor]
                for item in self._shard(url, size, offset):
                    if isinstance(item, Skip):
                        yield item
                        continue
                    at, sample = item
                    yield sample, (pass_, cursor, at + 1) if at + 1 < size else (pass_, cursor + 1, 0)
                cursor, offset = cursor + 1, 0
            pass_, cursor = pass_ + 1, 0

    def _shard(self, url: str, size: int, offset: int) -> Iterator[tuple[int, ShardSample | None] | Skip]:
        """(position, sample) for positions offset..size-1 of one shard; with bad_shards=skip the
        positions it could not deliver come as (position, None), after their `Skip`s."""
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
            yield Skip("bad_shard_samples", lost, f"rank {self.rank} skips {lost} sample(s) of a bad shard: {failure}")
            yield Skip("bad_shards")
            for at in range(max(read, offset), size):
                yield at, None
