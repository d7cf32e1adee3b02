"""The shard contract: WebDataset tars of `<key>.jpg` (absent for text-only samples) + `<key>.json`.

json = {"key", "source", "conversations", "image_caption", "retrieved": [{"text", "score",
"caption_id"}], "toxic", ...}. Shards are named `train-000000.tar`, … by a number fixed by the
input (see `retrieval.join`), so a re-run or a Slurm array task rewrites exactly the same files.
A shard is written under a temporary name and renamed when complete: a crash never leaves a
half-written `train-*.tar` for a loader to pick up.

Next to the shards: manifest.parquet (one row per written sample), rejects.parquet (one row per
input record that was not written) and stats.json; `written + rejected == input` always.

`iter_shard` is what the training loader reads with, in every worker: stdlib only, no decoding
of images (that is the encoder's job, after the sample is chosen).
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
import warnings
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path

SHARD_PREFIX = "train-"
_KEY = re.compile(r"[A-Za-z0-9_-]+")

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("offset", pa.int64()),
    ("n_tokens", pa.int64()), ("has_image", pa.bool_()), ("source", pa.string()),
])
REJECTS_SCHEMA = pa.schema([("key", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


class ShardSample(NamedTuple):
    key: str
    image: bytes | None      # JPEG bytes as stored; None for a text-only sample
    meta: dict[str, Any]     # the decoded `<key>.json`


class ShardFormatError(ValueError):
    """A shard that breaks the contract; the message names the shard and the sample."""


class ShardCountWarning(UserWarning):
    """Fewer shards than data readers: some ranks/workers would get no data."""


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:06d}.tar"


def shard_index(name: str) -> int:
    """Inverse of `shard_name`."""
    stem = Path(name).name.removeprefix(SHARD_PREFIX).removesuffix(".tar")
    if not stem.isdigit():
        raise ValueError(f"{name}: not a shard name like {shard_name(0)}")
    return int(stem)


class ShardWriter:
    """Writes one shard; `with ShardWriter(path) as shard: shard.write(key, jpeg, meta)`.

    Members get fixed owner/mtime so the same samples give byte-identical tars.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._tar = tarfile.open(self._partial, "w", format=tarfile.PAX_FORMAT)
        self.count = 0

    def write(self, key: str, image: bytes | None, meta: dict[str, Any]) -> int:
        """Append one sample; returns its offset (index within the shard)."""
        if not _KEY.fullmatch(key):
            raise ValueError(f"{self.path.name}: key {key!r} is not tar-safe ([A-Za-z0-9_-]+ only)")
        if image is not None:
            self._add(f"{key}.jpg", image)
        self._add(f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        self.count += 1
        return self.count - 1

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        self._tar.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def iter_shard(path: Path) -> Iterator[ShardSample]:
    """Samples of one shard in tar order. Members of a sample are consecutive (WebDataset's rule);
    the key is the member name up to its first dot."""
    path = Path(path)
    key, image, meta = None, None, None
    try:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base, _, ext = member.name.partition(".")
                if base != key:
                    if key is not None:
                        yield _sample(path, key, image, meta)
                    key, image, meta = base, None, None
                data = tar.extractfile(member).read()
                if ext == "jpg":
                    image = data
                elif ext == "json":
                    meta = data
    except tarfile.TarError as err:
        raise ShardFormatError(f"{path}: not a readable tar ({err})") from None
    if key is not None:
        yield _sample(path, key, image, meta)


def _sample(path: Path, key: str, image: bytes | None, meta: bytes | None) -> ShardSample:
    if meta is None:
        raise ShardFormatError(f"{path}: sample {key!r} has no {key}.json")
    try:
        return ShardSample(key, image, json.loads(meta))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardFormatError(f"{path}: {key}.json is not valid JSON ({err})") from None


def write_manifest(path: Path, rows: list[dict]) -> None:
    _write_parquet(path, rows, MANIFEST_SCHEMA)


def write_rejects(path: Path, rows: list[dict]) -> None:
    _write_parquet(path, [{"detail": "", **row} for row in rows], REJECTS_SCHEMA)


def read_table_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def write_stats(path: Path, stats: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")


def _write_parquet(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(sink.getvalue().to_pybytes())




def check_shard_count(n_shards: int, world_size: int, workers: int) -> str | None:
    """Warn (and return the message) when some of the `world_size × workers` readers would get no
    shard: shards are split by rank, then by data-loader worker, never below one shard."""
    readers = world_size * max(workers, 1)
    if n_shards >= readers:
        return None
    message = (f"only {n_shards} shard(s) for {world_size} rank(s) × {max(workers, 1)} loader worker(s) = "
               f"{readers} readers: {readers - n_shards} reader(s) would get no data. Write at least "
               f"{readers} shards (lower samples_per_shard in the retrieval_join config) or use fewer workers.")
    warnings.warn(message, ShardCountWarning, stacklevel=2)
    return message
