"""Where training samples come from: one shard set, or a weighted mixture of several.

A shard set is named by a `shards:` string, one of
  - a local folder                      data/shards/lcs558k
  - a URL prefix                        https://data.example.org/llava/lcs558k   s3://bucket/lcs558k
  - a brace-expanded list of shards     https://host/lcs558k/train-{000000..000127}.tar
                                        pipe:aws s3 cp s3://bucket/lcs558k/train-{000000..000127}.tar -
The shard list and the samples per shard come from the set's manifest.parquet (written by the
retrieval join; read through fsspec, or through the `manifest:` command for pipe: sets), never
from a directory listing: a remote set needs read access to its files only. A folder or prefix
means every shard its manifest lists; a list means those shards (a subset is fine).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import posixpath
import re
from pathlib import Path

import braceexpand
import pyarrow.parquet as pq

from pipeline.data.shards import READ_TIMEOUT_S, ShardReadError, is_remote, open_stream

MANIFEST = "manifest.parquet"
_SHARD_IN_URL = re.compile(r"[A-Za-z0-9_.-]+\.tar\b")


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """One entry of a training config's `data:` list."""
    shards: str
    weight: float = 1.0        # relative share of the draws (3 and 1: three samples of this per one of that)
    name: str | None = None    # in logs and MLflow metrics; default: the folder / prefix's last part
    manifest: str | None = None  # default: <folder or prefix>/manifest.parquet (required for pipe: lists)

    def __post_init__(self):
        object.__setattr__(self, "shards", str(self.shards))  # a Path from Python callers
        if not self.shards:
            raise ValueError("shards must name a folder, a URL prefix or a list of shard URLs")
        if not self.weight > 0:
            raise ValueError(f"{self.shards}: weight must be > 0, got {self.weight}")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        where = self.shards.strip().rstrip("/")
        if _is_list(where):  # the folder of the first shard (its token, inside a pipe: command)
            where = posixpath.dirname(next(t for t in _expand(where)[0].split() if _SHARD_IN_URL.search(t)))
        return posixpath.basename(where) or where


@dataclasses.dataclass(frozen=True)
class ShardSet:
    """A resolved data set: shard URLs in a fixed order and the samples each holds."""
    name: str
    weight: float
    urls: list[str]
    sizes: list[int]

    @property
    def samples(self) -> int:
        return sum(self.sizes)


def manifest_of(entry: DatasetConfig) -> str:
    """Where the set's manifest.parquet is."""
    return entry.manifest or _default_manifest(entry.shards.strip())


def read_manifest(manifest: str, columns: list[str], timeout_s: float = READ_TIMEOUT_S):
    """The manifest's `columns` as a pyarrow table (local, fsspec URL or pipe: command)."""
    if not is_remote(manifest) and not Path(manifest.removeprefix("file://")).is_file():
        raise FileNotFoundError(f"{manifest}: missing; shards need the manifest the join writes "
                                "(run the retrieval_join stage first)")
    data = _read_all(manifest, timeout_s)
    try:
        # One thread: Arrow's CPU pool, once used on a Python file object, can abort the process at
        # exit ("terminate called without an active exception", apache/arrow#34314, #50482); seen
        # here at the end of stage runs under load. A manifest is small: no pool needed.
        return pq.read_table(io.BytesIO(data), columns=columns, use_threads=False)
    except (OSError, KeyError, ValueError) as err:  # not parquet, a column missing
        raise ShardReadError(f"{manifest}: could not read the manifest ({err})") from None


def resolve(entry: DatasetConfig, timeout_s: float = READ_TIMEOUT_S) -> ShardSet:
    """The set's shards and sizes from its manifest; a clear error naming what is missing."""
    spec = entry.shards.strip()
    manifest = manifest_of(entry)
    sizes = manifest_sizes(manifest, timeout_s)
    if _is_list(spec):
        urls = _expand(spec)
        missing = [url for url in urls if _shard_of(url) not in sizes]
        if missing:
            raise ShardReadError(f"{missing[0]}: its shard is not listed in {manifest} "
                                 f"({len(missing)} of {len(urls)} URLs are not)")
    else:
        base = spec.rstrip("/")
        urls = [f"{base}/{name}" for name in sorted(sizes)]
    if not urls:
        raise ShardReadError(f"{manifest}: lists no samples (run the retrieval_join stage first)")
    return ShardSet(entry.label, entry.weight, urls, [sizes[_shard_of(url)] for url in urls])


def manifest_sizes(manifest: str, timeout_s: float = READ_TIMEOUT_S) -> dict[str, int]:
    """Samples per shard name, counted from the manifest's rows."""
    sizes: dict[str, int] = {}
    for shard in read_manifest(manifest, ["shard"], timeout_s).column("shard").to_pylist():
        name = posixpath.basename(shard)
        sizes[name] = sizes.get(name, 0) + 1
    return sizes


def _read_all(url: str, timeout_s: float) -> bytes:
    if url.startswith("pipe:") or not is_remote(url):
        with open_stream(url, timeout_s) as stream:
            return stream.read()
    import fsspec
    try:
        with fsspec.open(url, "rb", **_fsspec_options(url, timeout_s)) as stream:
            return stream.read()
    except ImportError as err:
        raise ShardReadError(f"{url}: no fsspec filesystem for this URL ({err}); install it "
                             "(e.g. s3fs) or give `manifest:` as a pipe: command") from None
    except (OSError, TimeoutError) as err:  # fsspec reports a refused connection as not found too
        raise ShardReadError(f"{url}: could not read the manifest: not found or unreachable "
                             f"({type(err).__name__}: {err})") from None


def _fsspec_options(url: str, timeout_s: float) -> dict:
    if url.startswith(("http://", "https://")):
        import aiohttp
        # block_size 0: one streamed GET (no range requests: plain HTTP servers need not support them)
        return {"block_size": 0, "client_kwargs": {"timeout": aiohttp.ClientTimeout(total=timeout_s)}}
    return {}


def _is_list(spec: str) -> bool:
    """A list of shards (braces, one .tar, or a pipe: command) rather than a folder or prefix."""
    return spec.startswith("pipe:") or "{" in spec or spec.endswith(".tar")


def _expand(spec: str) -> list[str]:
    return list(braceexpand.braceexpand(spec))


def _shard_of(url: str) -> str:
    """The shard file a URL reads: the last `<name>.tar` in it (also inside a pipe: command)."""
    found = _SHARD_IN_URL.findall(url)
    if not found:
        raise ShardReadError(f"{url}: names no .tar shard")
    return found[-1]


def _default_manifest(spec: str) -> str:
    if not _is_list(spec):
        return f"{spec.rstrip('/')}/{MANIFEST}"
    if spec.startswith("pipe:"):
        raise ShardReadError(f"{spec}: a pipe: shard list needs its manifest named, e.g. "
                             f"manifest: 'pipe:aws s3 cp s3://bucket/set/{MANIFEST} -'")
    return f"{posixpath.dirname(_expand(spec)[0])}/{MANIFEST}"


@functools.lru_cache(maxsize=8)
def resolve_all(entries: tuple[DatasetConfig, ...], timeout_s: float = READ_TIMEOUT_S) -> list[ShardSet]:
    """Every set of a config, resolved once per process (the preflight, the step count and the
    loader all ask)."""
    return [resolve(entry, timeout_s) for entry in entries]


def describe(sets: list[ShardSet]) -> str:
    """One line: each set's name, shards, samples and share of the draws."""
    total = sum(s.weight for s in sets)
    return "; ".join(f"{s.name}: {len(s.urls)} shard(s), {s.samples} samples, weight {s.weight:g} "
                     f"({s.weight / total:.0%} of draws)" for s in sets)
