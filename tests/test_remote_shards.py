"""Shards through webdataset's I/O: local, a loopback HTTP server, pipe: commands; weighted mixtures;
and the failures of remote storage (unreachable, cut short, stalled, shorter than the manifest)."""
from __future__ import annotations

import collections
import itertools
import logging
import random
import shutil

import pytest

from pipeline.data.loader import LoaderConfig, ShardBatches, batches_per_epoch, build_loader
from pipeline.data.mixture import Cursor, Mixture
from pipeline.data.shards import ShardReadError, ShardWriter, iter_shard, shard_name, write_manifest
from pipeline.data.sources import DatasetConfig, resolve
from tests.http_shards import ShardServer
from tests.mlflow_server import free_port


def write_set(root, prefix: str, shards: int, per_shard: int):
    """Text-only samples `<prefix>_<n>` (the loader tests need keys, not pixels)."""
    rows = []
    for s in range(shards):
        with ShardWriter(root / shard_name(s)) as writer:
            for i in range(per_shard):
                key = f"{prefix}_{s * per_shard + i:05d}"
                offset = writer.write(key, None, {"key": key, "conversations": [], "n": s * per_shard + i})
                rows.append({"key": key, "shard": shard_name(s), "offset": offset, "n_tokens": 1,
                             "has_image": False, "source": prefix})
    write_manifest(root / "manifest.parquet", rows)
    return root


def tag(sample):
    return (sample.dataset, sample.key)


def as_list(items):
    return list(items)


def made_up_length(item) -> int:
    return hash(item[1]) % 7


def loader(sets, rank=0, world=1, workers=2, batch=4, seed=0, **cfg):
    config = LoaderConfig(batch_size=batch, num_workers=workers, **cfg)
    return build_loader(sets, rank=rank, world_size=world, cfg=config, encode=tag, collate=as_list, seed=seed,
                        length=made_up_length)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    return {"a": write_set(root / "a", "a", shards=8, per_shard=10),
            "b": write_set(root / "b", "b", shards=4, per_shard=10)}


@pytest.fixture(scope="module")
def server(sets):
    with ShardServer(sets["a"].parent) as running:
        yield running


def test_http_prefix_list_and_pipe_read_the_same_samples_as_local_files(sets, server):
    local = resolve(DatasetConfig(str(sets["a"])))
    over_http = resolve(DatasetConfig(server.url("files", "a")))  # a prefix: shards from the manifest
    listed = resolve(DatasetConfig(server.url("files", "a/train-{000002..000004}.tar")))
    piped = resolve(DatasetConfig(f"pipe:cat {sets['a']}/train-{{000000..000007}}.tar",
                                  manifest=str(sets["a"] / "manifest.parquet")))
    assert local.name == over_http.name == listed.name == piped.name == "a"
    assert local.sizes == over_http.sizes == piped.sizes == [10] * 8 and listed.sizes == [10] * 3
    read = lambda s: [(x.key, x.image, x.meta) for url in s.urls for x in iter_shard(url)]  # noqa: E731
    assert read(over_http) == read(local) == read(piped)
    assert read(listed) == read(local)[20:50]


def test_a_remote_set_needs_its_manifest_never_a_listing(sets, server, tmp_path):
    shutil.copytree(sets["b"], tmp_path / "b")
    (tmp_path / "b" / "manifest.parquet").unlink()
    with ShardServer(tmp_path) as bare:
        with pytest.raises(ShardReadError, match="/files/b/manifest.parquet: could not read the manifest"):
            resolve(DatasetConfig(bare.url("files", "b")))
    with pytest.raises(ShardReadError, match="needs its manifest named"):
        resolve(DatasetConfig(f"pipe:cat {sets['b']}/train-000000.tar"))
    with pytest.raises(ShardReadError, match=r"train-000004.tar: its shard is not listed .*\(6 of 7 URLs"):
        resolve(DatasetConfig(server.url("files", "b/train-{000003..000009}.tar")))


def test_an_unreachable_server_is_an_error_naming_the_url(sets):
    dead = f"http://127.0.0.1:{free_port()}/a"
    with pytest.raises(ShardReadError, match=f"{dead}/manifest.parquet: could not read the manifest"):
        resolve(DatasetConfig(dead))
    with pytest.raises(ShardReadError, match=f"{dead}/train-000000.tar: .*could not connect"):
        list(iter_shard(f"{dead}/train-000000.tar"))


def remote_set(server, mode_of: dict[int, str], name="a"):
    """Set `a` over HTTP with some shards served through a fault mode (cut / stall)."""
    good = resolve(DatasetConfig(server.url("files", name)))
    urls = [url.replace("/files/", f"/{mode_of[i]}/") if i in mode_of else url for i, url in enumerate(good.urls)]
    return type(good)(good.name, good.weight, urls, good.sizes)


@pytest.mark.parametrize("mode", ["cut", "stall"])
def test_a_cut_or_stalled_stream_stops_the_epoch_with_the_shard_url(server, mode):
    bad = remote_set(server, {3: mode})
    with pytest.raises(ShardReadError if mode == "stall" else (ShardReadError, ValueError),
                       match=f"/{mode}/a/train-000003.tar"):
        list(loader([bad], workers=0, read_timeout_s=2))


def test_with_bad_shards_skip_every_missing_sample_is_counted_and_logged(server, sets, tmp_path, caplog):
    short = tmp_path / "short"
    shutil.copytree(sets["a"], short)
    write_set(tmp_path / "half", "a", shards=1, per_shard=5)  # train-000000.tar with 5 of its 10 samples
    shutil.copy(tmp_path / "half" / shard_name(0), short / shard_name(0))
    with ShardServer(tmp_path) as local_server:
        shortened = resolve(DatasetConfig(local_server.url("files", "short")))
        with pytest.raises(ShardReadError, match="train-000000.tar: ended after 5 samples, its manifest lists 10"):
            list(loader([shortened], workers=0, batch=1))
        skipping = loader([shortened], workers=0, batch=1, bad_shards="skip")
        with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
            keys = [k for batch in skipping for _, k in batch]
        assert len(keys) == 75 and skipping.dataset.skipped["bad_shard_samples"] == 5
        assert "train-000000.tar: ended after 5 samples" in caplog.text

    faulty = remote_set(server, {1: "cut", 5: "stall"})
    skipping = loader([faulty], workers=0, batch=1, bad_shards="skip", read_timeout_s=2)
    keys = [k for batch in skipping for _, k in batch]
    lost = skipping.dataset.skipped["bad_shard_samples"]
    assert skipping.dataset.skipped["bad_shards"] == 2 and len(keys) + lost == 80 and len(set(keys)) == len(keys)


def old_order(shards, rank, world, worker, workers, seed, epoch):
    """The single-set order before mixtures: rank split, worker split, one seeded shuffle."""
    order = list(shards[rank::world][worker::workers])
    random.Random(f"{seed}/{epoch}/{rank}/{worker}").shuffle(order)
    return order


def test_one_set_alone_keeps_the_sample_order_it_always_had(sets):
    one = resolve(DatasetConfig(str(sets["a"])))
    for rank, epoch in itertools.product(range(2), range(2)):
        dataset = ShardBatches([one], rank=rank, world_size=2, batch_size=1, encode=tag, collate=as_list, seed=7)
        dataset.set_epoch(epoch)
        got = [k for batch in dataset for _, k in batch]
        expected = [s.key for url in old_order(one.urls, rank, 2, 0, 1, 7, epoch) for s in iter_shard(url)]
        assert got == expected


def mixture(sets, weights=(3, 1)):
    return [resolve(DatasetConfig(str(sets["a"]), weight=weights[0])),
            resolve(DatasetConfig(str(sets["b"]), weight=weights[1]))]


def test_a_3_to_1_mixture_draws_3_to_1_and_repeats_the_smaller_share_only_as_weighted(sets):
    mix = mixture(sets, weights=(1, 3))  # b holds half as many samples as a but gets 3/4 of the draws
    counts, per_epoch = collections.Counter(), []
    for rank in range(2):
        for epoch in range(50):
            dataset = ShardBatches(mix, rank=rank, world_size=2, batch_size=1, encode=tag, collate=as_list, seed=3)
            dataset.set_epoch(epoch)
            drawn = [item for batch in dataset for item in batch]
            per_epoch.append(len(drawn))
            counts.update(name for name, _ in drawn)
    assert set(per_epoch) == {60}  # an epoch: as many draws as the rank's shards hold (40 of a + 20 of b)
    share = counts["b"] / (counts["a"] + counts["b"])
    assert share == pytest.approx(0.75, abs=0.01), counts  # 6000 draws: one standard deviation is 0.0056
    assert batches_per_epoch(mix, 2, LoaderConfig(batch_size=1, num_workers=1)) == 60


@pytest.mark.parametrize("stop_after,groups", [(1, 1), (7, 1), (4, 3)])
def test_a_mixture_resumes_with_exactly_the_next_batch(sets, server, stop_after, groups):
    local = mixture(sets)
    over_http = [resolve(DatasetConfig(server.url("files", n), weight=w)) for n, w in (("a", 3), ("b", 1))]
    for rank in range(2):
        full = list(loader(local, rank=rank, world=2, length_group_batches=groups))
        first = loader(over_http, rank=rank, world=2, length_group_batches=groups)
        head = list(itertools.islice(iter(first), stop_after))
        resumed = loader(over_http, rank=rank, world=2, length_group_batches=groups)
        resumed.load_state_dict(first.state_dict())
        assert head + list(resumed) == full, f"rank {rank}"


def test_a_mixture_read_from_any_cursor_continues_exactly_as_the_whole_read(sets):
    """The cursor after a sample is all a resume needs: reading from it gives the rest of the epoch."""
    mix = Mixture(mixture(sets), seed=3, epoch=1, rank=0, world_size=2)
    whole = list(mix.read(Cursor.start(2)))
    assert len(whole) == mix.draws_per_epoch() == 60 and whole[-1][1].draws == 60
    for k in (0, 1, 17, 59):
        sample, cursor = whole[k]
        assert [(s.key, s.dataset) for s, _ in mix.read(cursor)] == [(s.key, s.dataset) for s, _ in whole[k + 1:]]


def test_a_config_names_one_set_or_a_mixture(tmp_path, sets):
    from pipeline.config import ConfigError, load_config
    from pipeline.train.config import TrainConfig

    base = {"stage": "stage1", "run_dir": str(tmp_path / "run"),
            "model": {"llm": str(tmp_path), "vision_tower": str(tmp_path)}}
    path = tmp_path / "mix.yaml"
    import yaml
    path.write_text(yaml.safe_dump({**base, "data": [{"shards": str(sets["a"]), "weight": 3},
                                                     {"shards": str(sets["b"]), "name": "extra"}]}))
    cfg = load_config(TrainConfig, path)
    assert [(d.label, d.weight) for d in cfg.datasets] == [("a", 3.0), ("extra", 1.0)]
    assert load_config(TrainConfig, path, ["data=[]", f"shards={sets['a']}"]).datasets[0].label == "a"
    with pytest.raises(ConfigError, match="name the training data once"):
        load_config(TrainConfig, path, [f"shards={sets['a']}"])
    with pytest.raises(ConfigError, match="both called 'a'"):
        load_config(TrainConfig, path, [f"data=[{{shards: {sets['a']}}}, {{shards: {sets['a']}}}]"])
    with pytest.raises(ConfigError, match="weight must be > 0"):
        load_config(TrainConfig, path, [f"data=[{{shards: {sets['a']}, weight: 0}}]"])


def test_a_shard_error_from_a_loader_worker_is_one_line_naming_the_shard(server):
    from pipeline.data.shards import data_error_line

    bad = remote_set(server, {0: "cut", 1: "cut", 2: "cut", 3: "cut"})
    with pytest.raises((ShardReadError, ValueError)) as caught:
        list(loader([bad], workers=1))
    line = data_error_line(caught.value)
    assert "Caught" in str(caught.value) and "\n" not in line  # raised in a worker process
    assert "/cut/a/train-00000" in line and line.startswith("http://127.0.0.1:")
