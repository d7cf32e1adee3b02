"""The caption index folder: clip-retrieval's layout plus our stats.json.

    text.index              faiss index (inner product over L2-normalised CLIP text embeddings)
    text.json               autofaiss infos: index_key, index_param (search-time settings), ...
    metadata/*.parquet      one row per vector, in index order: caption, caption_id, source, toxic
    stats.json              ours, written last: complete, model, model_identity, embedding_dim, counts

A folder is complete exactly when stats.json says so and every file above is there; anything
else is "incomplete" and is rebuilt by caption_index, refused by retrieval_join.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

INDEX_FILES = ("text.index", "text.json", "stats.json")
# faiss index-file headers of flat (code array) indexes: memory-mapped with IO_FLAG_MMAP_IFC;
# IVF indexes memory-map their inverted lists with IO_FLAG_MMAP; HNSW is always read into RAM.
_FLAT_HEADERS = (b"IxFI", b"IxF2", b"IxFl")


class IndexFolderError(ValueError):
    """The index folder is missing, incomplete or does not fit the data it is used with."""


@dataclasses.dataclass(frozen=True)
class IndexInfo:
    folder: Path
    model: str
    model_identity: str
    embedding_dim: int
    n_vectors: int
    index_key: str
    index_param: str


@dataclasses.dataclass(frozen=True)
class CaptionTable:
    """Index row i → caption: texts[i], caption_ids[i], toxic[i]."""
    texts: list[str]
    caption_ids: list[str]
    toxic: np.ndarray


def model_identity(clip_model: str) -> str:
    """What makes two CLIP model strings the same model. For a local folder: its name plus a hash of
    config.json and the weight files' names and sizes, so a moved or relatively-referenced copy
    matches and a different checkpoint does not. Hub/open_clip names are their own identity."""
    prefix, sep, target = clip_model.partition(":")
    folder = Path(target) if sep else Path(clip_model)
    if not folder.is_dir():
        return clip_model
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return f"{prefix + ':' if sep else ''}{folder.resolve().name}@{digest.hexdigest()[:12]}"


def projection_dim(clip_model: str) -> int | None:
    """Embedding size a local HF CLIP folder declares (config.json `projection_dim`), else None."""
    config = Path(clip_model.partition(":")[2] or clip_model) / "config.json"
    if not config.is_file():
        return None
    value = _read_json(config).get("projection_dim")
    return int(value) if isinstance(value, int) else None


def missing_parts(folder: Path) -> list[str]:
    """What a complete index folder lacks (empty list = complete)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"the folder {folder}"]
    missing = [name for name in INDEX_FILES if not (folder / name).is_file()]
    if not list((folder / "metadata").glob("*.parquet")):
        missing.append("metadata/*.parquet")
    if "stats.json" not in missing and not _read_json(folder / "stats.json").get("complete"):
        missing.append("stats.json marked complete")
    return missing


def read_index_info(folder: Path) -> IndexInfo:
    folder = Path(folder)
    missing = missing_parts(folder)
    if missing:
        raise IndexFolderError(f"index folder {folder} is missing or incomplete (no {', '.join(missing)}); "
                               "run the caption_index stage to (re)build it")
    stats = _read_json(folder / "stats.json")
    infos = _read_json(folder / "text.json")
    return IndexInfo(folder, stats["model"], stats["model_identity"], int(stats["embedding_dim"]),
                     int(stats["n_vectors"]), str(infos.get("index_key", "")), str(infos.get("index_param", "")))


def check_model(info: IndexInfo, clip_model: str) -> None:
    """Image and text embeddings only compare within one CLIP model."""
    identity = model_identity(clip_model)
    if identity != info.model_identity:
        raise IndexFolderError(
            f"CLIP model mismatch: the index {info.folder} was built with {info.model!r} ({info.model_identity}), "
            f"this run embeds images with {clip_model!r} ({identity}). Use the index's model, or rebuild the index.")


def check_dim(info: IndexInfo, dim: int, what: str) -> None:
    if dim != info.embedding_dim:
        raise IndexFolderError(f"embedding dimension mismatch: {what} has dimension {dim}, the index "
                               f"{info.folder} holds {info.embedding_dim}-d vectors (model {info.model!r})")


def open_index(info: IndexInfo, index_param: str | None = None) -> faiss.Index:
    """The faiss index, memory-mapped where its type allows, with search parameters `index_param`
    (faiss ParameterSpace syntax, "nprobe=32") or else autofaiss' tuned ones from text.json (not
    all of them, e.g. HNSW's efSearch, are stored in the index file)."""
    path = info.folder / "text.index"
    with path.open("rb") as f:
        header = f.read(4)
    mmap = faiss.IO_FLAG_MMAP_IFC if header in _FLAT_HEADERS else faiss.IO_FLAG_MMAP
    index = faiss.read_index(str(path), mmap | faiss.IO_FLAG_READ_ONLY)
    if index.ntotal != info.n_vectors or index.d != info.embedding_dim:
        raise IndexFolderError(f"{path}: holds {index.ntotal} vectors of dim {index.d}, stats.json says "
                               f"{info.n_vectors} of dim {info.embedding_dim}; rebuild the index")
    params = info.index_param if index_param is None else index_param
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)
    return index


def metadata_files(folder: Path) -> list[Path]:
    """In index order: the same sorted-name order autofaiss read the embedding partitions in."""
    return sorted((Path(folder) / "metadata").glob("*.parquet"), key=lambda p: p.name)


def load_caption_table(info: IndexInfo) -> CaptionTable:
    columns = ["caption", "caption_id", "toxic"]
    tables = []
    for path in metadata_files(info.folder):
        schema = pq.read_schema(path)
        absent = [c for c in columns if c not in schema.names]
        if absent:
            raise IndexFolderError(f"{path}: no column(s) {', '.join(absent)}; was the index built by caption_index?")
        tables.append(pq.read_table(path, columns=columns))
    table = pa.concat_tables(tables)
    if table.num_rows != info.n_vectors:
        raise IndexFolderError(f"{info.folder}: metadata has {table.num_rows} rows for {info.n_vectors} vectors; "
                               "rebuild the index")
    return CaptionTable(table.column("caption").to_pylist(), [str(c) for c in table.column("caption_id").to_pylist()],
                        np.asarray(table.column("toxic").to_pylist(), dtype=bool))


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
