"""Reading what `clip-retrieval inference` wrote: `{img,text}_emb/<kind>_emb_<n>.npy` + `metadata/metadata_<n>.parquet`.

Partition n's npy rows and metadata rows belong together; the order of rows inside and across
partitions is *not* the input order (samples are dealt to partitions and data-loader workers),
so callers map rows back through metadata columns (our `.json` fields), never by position.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_PARTITION = re.compile(r"_(\d+)\.(npy|parquet)$")


class EmbeddingsError(RuntimeError):
    """clip-retrieval's output is incomplete or inconsistent."""


def partition_files(folder: Path, kind: Literal["img", "text"]) -> list[tuple[Path, Path]]:
    """(npy, metadata parquet) per partition, sorted by file name: autofaiss adds vectors in that
    order and clip-retrieval's back end reads metadata in that order (names are zero-padded)."""
    folder = Path(folder)
    emb = {_suffix(p): p for p in (folder / f"{kind}_emb").glob("*.npy")}
    meta = {_suffix(p): p for p in (folder / "metadata").glob("*.parquet")}
    if emb.keys() != meta.keys():
        raise EmbeddingsError(f"{folder}: embedding partitions {sorted(emb)} and metadata partitions "
                              f"{sorted(meta)} differ; the inference run is incomplete, rerun it")
    return [(emb[n], meta[n]) for n in sorted(emb, key=lambda n: emb[n].name)]


def read_embeddings(folder: Path, kind: Literal["img", "text"]) -> tuple[np.ndarray, pa.Table]:
    """All partitions concatenated: (embeddings (n, d) as stored, metadata table of n rows)."""
    matrices, tables = [], []
    for npy, parquet in partition_files(folder, kind):
        matrix = np.load(npy, mmap_mode="r")
        table = pq.read_table(parquet)
        if matrix.shape[0] != table.num_rows:
            raise EmbeddingsError(f"{npy} has {matrix.shape[0]} rows but {parquet} has {table.num_rows}")
        matrices.append(matrix)
        tables.append(table)
    if not matrices:
        return np.zeros((0, 0), np.float32), pa.table({})
    return np.concatenate(matrices), pa.concat_tables(tables, promote_options="default")


def _suffix(path: Path) -> str:
    match = _PARTITION.search(path.name)
    if not match:
        raise EmbeddingsError(f"{path}: unexpected file name in clip-retrieval output")
    return match.group(1)
