"""pipeline/data/shards.py: the shard contract, its writer and reader, the side files."""
from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline.data.shards import (
    ShardCountWarning,
    ShardFormatError,
    ShardWriter,
    check_shard_count,
    iter_shard,
    shard_index,
    shard_name,
    write_manifest,
    write_rejects,
    write_stats,
)


def jpeg(color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(out, format="JPEG")
    return out.getvalue()


def meta(key: str) -> dict:
    return {"key": key, "source": "test", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                          {"from": "gpt", "value": "A red square, naïve café."}],
            "image_caption": "a red square", "retrieved": [{"text": "a red box", "score": 0.9, "caption_id": "c1"}],
            "toxic": False}


SAMPLES = [("000000001", jpeg(), meta("000000001")), ("text-00001", None, meta("text-00001")),
           ("GCC_train_2", jpeg((0, 0, 255)), meta("GCC_train_2"))]


def write(path, samples=SAMPLES):
    with ShardWriter(path) as shard:
        offsets = [shard.write(key, image, m) for key, image, m in samples]
    return offsets


def test_written_samples_read_back_identically_in_order(tmp_path):
    path = tmp_path / shard_name(0)
    assert write(path) == [0, 1, 2]
    read = list(iter_shard(path))
    assert [(s.key, s.image, s.meta) for s in read] == SAMPLES
    assert read[1].image is None  # text-only: no .jpg member at all
    assert [m.name for m in tarfile.open(path)] == [
        "000000001.jpg", "000000001.json", "text-00001.json", "GCC_train_2.jpg", "GCC_train_2.json"]


def test_webdataset_reads_our_shards_with_the_same_keys(tmp_path):
    path = tmp_path / shard_name(3)
    write(path)
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [key for key, _, _ in SAMPLES]
    assert samples[0]["jpg"] == SAMPLES[0][1] and "jpg" not in samples[1]
    assert json.loads(samples[2]["json"]) == SAMPLES[2][2]


def test_same_samples_give_byte_identical_shards(tmp_path):
    write(tmp_path / "a.tar")
    write(tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


@pytest.mark.parametrize("key", ["a.b", "dir/a", "", "a b"])
def test_keys_that_are_not_tar_safe_are_refused(tmp_path, key):
    with pytest.raises(ValueError, match="not tar-safe"), ShardWriter(tmp_path / "x.tar") as shard:
        shard.write(key, None, {})


def test_a_failed_write_leaves_no_shard_behind(tmp_path):
    path = tmp_path / shard_name(1)
    with pytest.raises(RuntimeError), ShardWriter(path) as shard:
        shard.write("k1", jpeg(), meta("k1"))
        raise RuntimeError("crash mid-shard")
    assert list(tmp_path.iterdir()) == []


def test_sample_without_json_is_a_format_error_naming_the_key(tmp_path):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("lonely.jpg")
        data = jpeg()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardFormatError, match="lonely"):
        list(iter_shard(path))


def test_truncated_shard_is_a_format_error(tmp_path):
    path = tmp_path / shard_name(0)
    write(path)
    path.write_bytes(path.read_bytes()[:700])
    with pytest.raises(ShardFormatError, match=path.name):
        list(iter_shard(path))


def test_shard_names_are_numbered_and_invertible():
    assert shard_name(12) == "train-000012.tar"
    assert shard_index("some/dir/train-000012.tar") == 12
    with pytest.raises(ValueError):
        shard_index("manifest.parquet")


def test_manifest_rejects_and_stats_round_trip(tmp_path):
    rows = [{"key": "a", "shard": shard_name(0), "offset": 0, "n_tokens": 12, "has_image": True, "source": "s"}]
    write_manifest(tmp_path / "manifest.parquet", rows)
    write_rejects(tmp_path / "rejects.parquet", [{"key": "b", "reason": "missing_image"}])
    write_stats(tmp_path / "stats.json", {"counts": {"input": 2, "written": 1, "rejected": {"missing_image": 1}}})
    assert pq.read_table(tmp_path / "manifest.parquet").to_pylist() == rows
    assert pq.read_table(tmp_path / "rejects.parquet").to_pylist() == [
        {"key": "b", "reason": "missing_image", "detail": ""}]
    assert json.loads((tmp_path / "stats.json").read_text())["counts"]["written"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.parquet", "rejects.parquet", "stats.json"]


def test_too_few_shards_for_ranks_times_workers_warns_with_the_numbers():
    with pytest.warns(ShardCountWarning, match=r"only 6 shard\(s\) for 4 rank\(s\) × 2 loader worker\(s\) = 8"):
        message = check_shard_count(6, world_size=4, workers=2)
    assert "2 reader(s) would get no data" in message


def test_enough_shards_give_no_warning(recwarn):
    assert check_shard_count(8, world_size=4, workers=2) is None
    assert check_shard_count(4, world_size=4, workers=0) is None  # workers=0: the main process reads
    assert not recwarn.list
