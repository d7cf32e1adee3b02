"""The shard loader resumes with exactly the next batch, on every rank, with several workers."""
from __future__ import annotations

import itertools

import pytest

from pipeline.data.loader import LoaderConfig, batches_per_epoch, build_loader, length_grouped
from pipeline.data.shards import ShardCountWarning, write_manifest
from pipeline.data.sources import DatasetConfig, resolve
from tests.conftest import write_training_shards


def keys_only(sample):
    return sample.key


def as_list(keys):
    return list(keys)


def key_length(key: str) -> int:
    """A made-up sample length: the grouping only needs a number per sample."""
    return (int(key.rsplit("_", 1)[1]) * 37) % 11


def sets_of(shards):
    return [resolve(DatasetConfig(str(shards)))]


def make_loader(shards, rank, world=2, workers=2, batch=3, seed=0, groups=1):
    cfg = LoaderConfig(batch_size=batch, num_workers=workers, length_group_batches=groups)
    return build_loader(sets_of(shards), rank=rank, world_size=world, cfg=cfg, encode=keys_only, collate=as_list,
                        seed=seed, length=key_length)


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
    assert batches_per_epoch(sets_of(shards), 2, LoaderConfig(batch_size=3, num_workers=2)) == 8


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


def test_missing_or_empty_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "train-000000.tar").write_bytes(b"")  # shards alone are not enough: no listing is used
    with pytest.raises(FileNotFoundError, match="manifest.parquet: missing"):
        make_loader(tmp_path, 0)
    write_manifest(tmp_path / "manifest.parquet", [])
    with pytest.raises(OSError, match="lists no samples"):
        make_loader(tmp_path, 0)


def test_length_grouping_orders_each_group_by_length_and_reads_the_same_samples(shards):
    plain = [k for b in make_loader(shards, 0, workers=1, world=1, batch=4) for k in b]
    grouped = list(make_loader(shards, 0, workers=1, world=1, batch=4, groups=3))
    keys = [k for b in grouped for k in b]
    assert sorted(keys) == sorted(plain) and keys != plain
    for start in range(0, len(grouped) - 2, 3):  # groups of 3 batches: lengths ascend through each
        lengths = [key_length(k) for b in grouped[start:start + 3] for k in b]
        assert lengths == sorted(lengths)
    assert all(len(b) == 4 for b in grouped)


@pytest.mark.parametrize("stop_after", [1, 2, 3, 5])
def test_resume_inside_a_length_group_continues_with_exactly_the_next_batch(shards, stop_after):
    for rank in range(2):
        full = list(make_loader(shards, rank, groups=3))
        first = make_loader(shards, rank, groups=3)
        head = list(itertools.islice(iter(first), stop_after))
        state = first.state_dict()
        resumed = make_loader(shards, rank, groups=3)
        resumed.load_state_dict(state)
        assert head + list(resumed) == full, f"rank {rank}: resumed order differs"


def test_the_resume_state_is_the_flat_dict_earlier_checkpoints_hold(shards):
    """Checkpoints written before the loader became a chain hold these keys and values: they load."""
    loader = make_loader(shards, 0, workers=0, groups=3)
    batches = iter(loader)
    head = [next(batches) for _ in range(2)]
    state = loader.dataset.state_dict()
    assert set(state) == {"epoch", "draws", "positions", "yielded", "skipped"}
    assert state["yielded"] == 2 and state["draws"] == 0  # inside the first length group: its start, 2 done
    assert all(isinstance(p, list) and len(p) == 3 for p in state["positions"])
    resumed = make_loader(shards, 0, workers=0, groups=3)
    resumed.dataset.load_state_dict({k: v for k, v in state.items() if k != "skipped"})  # older: no skips
    assert head + list(resumed) == list(make_loader(shards, 0, workers=0, groups=3))


def test_length_grouping_is_a_stable_sort_into_full_batches():
    assert length_grouped([5, 1, 4, 1, 3, 9, 2], 3, length=lambda x: x) == [[1, 1, 3], [4, 5, 9]]
    assert length_grouped([5, 1, 4, 1, 3, 9, 2], 3, length=None) == [[5, 1, 4], [1, 3, 9]]  # as read
    pairs = [("b", 1), ("a", 1), ("c", 0)]
    assert length_grouped(pairs, 3, length=lambda p: p[1]) == [[("c", 0), ("b", 1), ("a", 1)]]  # ties keep order
