"""The shard contract: WebDataset tars of `<key>.jpg` (absent for text-only samples) + `<key>.json`.

json = {"key", "source", "conversations", "image_caption", "retrieved": [{"text", "score",
"caption_id"}], "toxic", ...}. Shards are named `train-000000.tar`, … by a number fixed by the
input (see `retrieval.join`), so a re-run or a Slurm array task rewrites exactly the same files.
A shard is written under a temporary name and renamed when complete: a crash never leaves a
half-written `train-*.tar` for a loader to pick up.

Next to the shards: manifest.parquet (one row per written sample), rejects.parquet (one row per
input record that was not written) and stats.json; `written + rejected == input` always.

Both directions go through webdataset: `ShardWriter` wraps `webdataset.TarWriter`, and
`iter_shard` opens a shard with `webdataset.gopen` (a local path, `http(s)://` through curl, a
`pipe:` command such as `pipe:aws s3 cp s3://bucket/train-000000.tar -`; any other scheme that an
installed fsspec filesystem knows, e.g. `s3://` with s3fs) and groups members into samples with
webdataset's tar expander and key grouping. A stream that stalls longer than the read timeout is
killed and named in the error, so a dead server never hangs a job. No decoding of images here (that is
the encoder's job, after the sample is chosen).
"""
from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import tarfile
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Iterator, NamedTuple
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from webdataset.gopen import Pipe, gopen_schemes
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.atomic import atomic_path

SHARD_PREFIX = "train-"
_KEY = re.compile(r"[A-Za-z0-9_-]+")
READ_TIMEOUT_S = 120.0  # no byte for this long from a remote shard: the stream is dead

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("offset", pa.int64()),
    ("n_tokens", pa.int64()), ("has_image", pa.bool_()), ("source", pa.string()),
])
REJECTS_SCHEMA = pa.schema([("key", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


class ShardSample(NamedTuple):
    key: str
    image: bytes | None      # JPEG bytes as stored; None for a text-only sample
    meta: dict[str, Any]     # the decoded `<key>.json`
    dataset: str = ""        # the training data set it was drawn from (a mixture's entry name)


class ShardFormatError(ValueError):
    """A shard that breaks the contract; the message names the shard and the sample."""


class ShardReadError(OSError):
    """A shard that could not be read to its end (unreachable, stalled, cut short); names the URL."""


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

    Members get a fixed owner/mtime/mode and the PAX format, so the same samples give
    byte-identical tars.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._file = open(self._partial, "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, user="", group="", mode=0o644, mtime=0,
                                  format="PAX_FORMAT")
        self.count = 0

    def write(self, key: str, image: bytes | None, meta: dict[str, Any]) -> int:
        """Append one sample; returns its offset (index within the shard)."""
        if not _KEY.fullmatch(key):
            raise ValueError(f"{self.path.name}: key {key!r} is not tar-safe ([A-Za-z0-9_-]+ only)")
        sample = {"__key__": key, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
        if image is not None:
            sample["jpg"] = image
        self._tar.write(sample)  # members in sorted order: <key>.jpg, then <key>.json
        self.count += 1
        return self.count - 1

    def close(self) -> None:
        self._tar.close()
        self._file.close()
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def is_remote(url: str | Path) -> bool:
    """A URL (`scheme://…` or `pipe:…`) rather than a local path."""
    text = str(url)
    return text.startswith("pipe:") or "://" in text and not text.startswith("file://")


def open_stream(url: str | Path, timeout_s: float = READ_TIMEOUT_S) -> BinaryIO:
    """A readable binary stream of `url` (local path, file://, http(s)://, pipe:, or an fsspec URL).

    Subprocess streams (curl for http, `pipe:` commands) are watched: no byte for `timeout_s` kills
    the command and raises ShardReadError; a non-zero exit raises it too, naming the URL.
    """
    text = str(url)
    scheme = "pipe" if text.startswith("pipe:") else urlparse(text).scheme
    if scheme in ("", "file"):
        return open(text.removeprefix("file://"), "rb")
    if scheme in gopen_schemes:
        stream = wds.gopen(text, "rb")
        return _Watched(stream, text, timeout_s) if isinstance(stream, Pipe) else stream
    import fsspec  # s3://, gs://, … when their filesystem package is installed
    try:
        return fsspec.open(text, "rb").open()
    except (ImportError, ValueError) as err:
        raise ShardReadError(f"{text}: no reader for scheme '{scheme}' ({err}); install its fsspec "
                             "filesystem (e.g. s3fs) or use a pipe: URL") from None


class _Watched(io.RawIOBase):
    """A webdataset `Pipe` read with a deadline per read: select() on its stdout, then os.read."""

    def __init__(self, pipe: Pipe, url: str, timeout_s: float):
        self.pipe, self.url, self.timeout_s = pipe, url, timeout_s
        self.fd = pipe.stream.fileno()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        ready, _, _ = select.select([self.fd], [], [], self.timeout_s)
        if not ready:
            self._kill()
            raise ShardReadError(f"{self.url}: no data for {self.timeout_s:g} s (server or command "
                                 "stalled); the stream was stopped")
        data = os.read(self.fd, len(buffer))
        if not data:
            self._check_exit()
        buffer[:len(data)] = data
        return len(data)

    def _check_exit(self) -> None:
        status = self.pipe.proc.wait()
        if status not in (0, 141):  # 141: SIGPIPE after the reader stopped early
            raise ShardReadError(f"{self.url}: the reading command exited with status {status}"
                                 f"{_CURL_EXITS.get(status, '')}")

    def _kill(self) -> None:
        if self.pipe.proc.poll() is None:
            self.pipe.proc.send_signal(signal.SIGKILL)
        self.pipe.proc.wait()

    def close(self) -> None:
        if not self.closed:
            self._kill()
            self.pipe.stream.close()
        super().close()


_CURL_EXITS = {6: " (curl: could not resolve host)", 7: " (curl: could not connect)",
               18: " (curl: transfer cut short)", 22: " (curl: HTTP error, e.g. 404)",
               28: " (curl: timed out)", 56: " (curl: connection reset)"}


def iter_shard(url: str | Path, timeout_s: float = READ_TIMEOUT_S) -> Iterator[ShardSample]:
    """Samples of one shard in tar order, grouped by key as webdataset does (members of a sample
    are consecutive; the key is the member name up to its first dot)."""
    name = str(url)
    stream = open_stream(url, timeout_s)
    try:
        files = tar_file_expander([{"url": name, "stream": stream}], eof_value=None)
        for grouped in group_by_keys(files):
            yield _sample(name, grouped)
    except ShardReadError as err:  # webdataset appends the stream and URL to the arguments
        raise ShardReadError(_first_arg(err)) from None
    except ShardFormatError:
        raise
    except (tarfile.TarError, OSError, ValueError, EOFError) as err:
        raise ShardFormatError(f"{name}: not a readable tar ({_first_arg(err)})") from None
    finally:
        stream.close()


def _first_arg(err: BaseException) -> str:
    """The message without what webdataset appends (` @ <stream>`, the stream, the URL)."""
    return str(err.args[0]).split(" @ <")[0] if err.args else type(err).__name__


def _sample(url: str, grouped: dict[str, Any]) -> ShardSample:
    key = grouped["__key__"]
    meta = grouped.get("json")
    if meta is None:
        raise ShardFormatError(f"{url}: sample {key!r} has no {key}.json")
    try:
        return ShardSample(key, grouped.get("jpg"), json.loads(meta))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardFormatError(f"{url}: {key}.json is not valid JSON ({err})") from None


def write_manifest(path: Path, rows: list[dict]) -> None:
    _write_parquet(path, rows, MANIFEST_SCHEMA)


def write_rejects(path: Path, rows: list[dict]) -> None:
    _write_parquet(path, [{"detail": "", **row} for row in rows], REJECTS_SCHEMA)


def read_table_rows(path: Path) -> list[dict]:
    return pq.read_table(path, use_threads=False).to_pylist()  # no Arrow pool: see sources.read_manifest


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




def check_shard_count(n_shards: int, world_size: int, workers: int, what: str | None = None) -> str | None:
    """Warn (and return the message) when some of the `world_size × workers` readers would get no
    shard: shards are split by rank, then by data-loader worker, never below one shard.
    `what`: the data set's name in a mixture (its readers without a shard draw from the others)."""
    readers = world_size * max(workers, 1)
    if n_shards >= readers:
        return None
    consequence = (f"{readers - n_shards} reader(s) would never draw from it" if what else
                   f"{readers - n_shards} reader(s) would get no data")
    message = (f"{what + ': ' if what else ''}only {n_shards} shard(s) for {world_size} rank(s) × "
               f"{max(workers, 1)} loader worker(s) = {readers} readers: {consequence}. Write at least "
               f"{readers} shards (lower samples_per_shard in the retrieval_join config) or use fewer workers.")
    warnings.warn(message, ShardCountWarning, stacklevel=2)
    return message


def data_error_line(err: Exception) -> str:
    """The shard error's own message, also when a loader worker raised it (torch then prefixes
    "Caught … in DataLoader worker process N" and the worker's traceback)."""
    name = type(err).__name__
    lines = [line for line in str(err).splitlines() if line.strip()]
    own = [line.split(": ", 1)[1] for line in lines if line.startswith(f"{name}: ") or
           line.startswith(f"pipeline.data.shards.{name}: ")]
    return own[-1] if own else (lines[0] if lines else name)
