"""The shard loader resumes with exactly the next batch, on every rank, with several workers."""
from __future__ import annotations

import itertools

import pytest

from pipeline.data.loader import LoaderConfig, batches_per_epoch, build_loader
from pipeline.data.shards import ShardCountWarning
from tests.conftest import write_training_shards


def keys_only(sample):
    return sample.key


def as_list(keys):
    return list(keys)


def make_loader(shards, rank, world=2, workers=2, batch=3, seed=0):
    return build_loader(shards, rank=rank, world_size=world, cfg=LoaderConfig(batch_size=batch, num_workers=workers),
                        encode=keys_only, collate=as_list, seed=seed)


@pytest.fixture(scope="module")
def shards(tiny_world, tmp_path_factory):
    # 8 shards of 7 samples: batches of 3 span shard boundaries and leave epoch tails
    return write_training_shards(tiny_world, tmp_path_factory.mktemp("loader"), samples=56, per_shard=7)


def test_every_sample_is_read_once_per_epoch_across_ranks_and_workers(shards):
    seen = []
    for rank in range(2):
        loader = make_loader(shards, rank)
        batches = list(loader)
        seen += [k for b in batches for k in b]
        assert all(len(b) == 3 for b in batches)
    assert len(seen) == len(set(seen))
    # each worker reads 2 shards = 14 samples = 4 batches + 2 left over (logged as epoch_tail)
    assert len(seen) == 56 - 2 * 2 * 2
    assert batches_per_epoch(shards, 2, LoaderConfig(batch_size=3, num_workers=2)) == 8


@pytest.mark.parametrize("stop_after", [1, 3, 6])
def test_resume_mid_shard_continues_with_exactly_the_next_batch_on_every_rank(shards, stop_after):
    for rank in range(2):
        full = list(make_loader(shards, rank))
        first = make_loader(shards, rank)
        head = list(itertools.islice(iter(first), stop_after))
        state = first.state_dict()
        resumed = make_loader(shards, rank)
        resumed.load_state_dict(state)
        tail = list(resumed)
        assert head + tail == full, f"rank {rank}: resumed order differs"


def test_next_epoch_reads_the_same_samples_in_a_new_shard_order(shards):
    loader = make_loader(shards, 0, workers=1, world=1, batch=1)  # no epoch tail
    first = [k for b in loader for k in b]
    loader.dataset.set_epoch(1)
    second = [k for b in loader for k in b]
    assert sorted(first) == sorted(second) and first != second


def test_fewer_shards_than_ranks_is_refused_and_fewer_than_readers_warned(shards):
    with pytest.raises(ValueError, match="8 shard\\(s\\) for 9 ranks"):
        make_loader(shards, 0, world=9, workers=1)
    with pytest.warns(ShardCountWarning, match="only 8 shard\\(s\\) for 2 rank\\(s\\) × 8 loader worker"):
        make_loader(shards, 0, world=2, workers=8)


def test_missing_manifest_or_shards_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        make_loader(tmp_path, 0)
    (tmp_path / "train-000000.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="manifest.parquet: missing"):
        batches_per_epoch(tmp_path, 1, LoaderConfig())
