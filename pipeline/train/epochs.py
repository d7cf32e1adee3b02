"""Batches across epochs, with the end of an epoch agreed by all ranks (a collective).

The loader (pipeline/data/loader.py) may run dry on one rank before the others (rejects, uneven
shards); a rank that stopped while the others go on would leave them waiting in the next forward's
ZeRO-3 gather. Here every rank starts the next epoch together as soon as any rank runs dry.
"""
from __future__ import annotations

import logging

from torchdata.stateful_dataloader import StatefulDataLoader

from pipeline.data.batch import Batch
from pipeline.train.distributed import any_rank
from pipeline.train.state import TrainState

log = logging.getLogger("pipeline.train")


class AgreedEpochs:
    """`loader`: this rank's (pipeline.data.loader.build_loader); `state.epoch` is advanced here;
    `resumed`: the run restored a checkpoint (whose epoch may already be spent on this rank);
    `data`: how the data is named in an error."""

    def __init__(self, loader: StatefulDataLoader, state: TrainState, *, rank: int, resumed: bool, data: str):
        self.loader, self.state, self.rank, self.data = loader, state, rank, data
        self.batches = iter(loader)
        self.this_epoch, self.fresh = 0, not resumed

    def next_batch(self) -> Batch | None:
        """The next batch, or None when this call started a new epoch (a collective)."""
        batch = next(self.batches, None)
        if not any_rank(batch is None)[0]:
            self.this_epoch += 1
            return batch
        if self.this_epoch == 0 and self.fresh:
            raise RuntimeError(f"{self.data}: rank {self.rank} got no batch in epoch {self.state.epoch} "
                               "(all its samples rejected?); see the skip warnings above")
        if batch is not None:
            log.info("rank %d: epoch %d ends on another rank; its last fetched batch (%d samples) "
                     "is left for the next epoch", self.rank, self.state.epoch, len(batch))
        self.this_epoch, self.fresh = 0, True
        self.state.epoch += 1
        self.loader.dataset.set_epoch(self.state.epoch)
        self.batches = iter(self.loader)
        return None
