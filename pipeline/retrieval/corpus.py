"""The caption corpus: read, normalise, drop exact duplicates, write clip-retrieval's input tars.

clip-retrieval reads WebDataset tars (or folders of .txt), not parquet, and reorders rows across
its partitions: every caption therefore travels with its id in `<key>.json`, which comes back as
columns of the index metadata (`--enable_metadata True`). Nothing downstream relies on row order.
"""
from __future__ import annotations

import dataclasses
import io
import json
import re
import tarfile
import unicodedata
from pathlib import Path
from typing import Iterable

import pyarrow.parquet as pq

_SPACE = re.compile(r"\s+")
# Control and invisible format characters (zero-width spaces, bidi marks, BOM); whitespace controls
# (\t \n \r ...) are left to _SPACE.
_INVISIBLE = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")


class CorpusError(ValueError):
    """The corpus as a whole cannot be indexed; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class Caption:
    caption_id: str
    text: str
    source: str
    toxic: bool


def normalize_text(text: str) -> str:
    """NFC, control characters dropped, every whitespace run → one space, trimmed. Case and
    punctuation stay: the text is shown to the LLM as written."""
    text = _INVISIBLE.sub("", unicodedata.normalize("NFC", text))
    return _SPACE.sub(" ", text).strip()


def read_captions(path: Path, *, toxic: bool = False, require_ids: bool = True) -> list[Caption]:
    """Rows of a parquet / jsonl file (caption_id, text, optional source, toxic) or of a .txt file
    (one text per line). Without ids (`require_ids=False`, .txt), ids are `<file stem>-<row>`."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: caption file not found")
    rows = _read_rows(path)
    captions = []
    for row_number, row in enumerate(rows):
        if not isinstance(row, dict) or "text" not in row:
            raise CorpusError(f"{path}: row {row_number} has no 'text' field (got {str(row)[:80]})")
        caption_id = row.get("caption_id")
        if caption_id is None:
            if require_ids:
                raise CorpusError(f"{path}: row {row_number} has no caption_id; the corpus needs one id per caption")
            caption_id = f"{path.stem}-{row_number:09d}"
        text = row["text"]
        if text is not None and not isinstance(text, str):
            raise CorpusError(f"{path}: row {row_number} (caption_id {caption_id}): "
                              f"text is {type(text).__name__}, not str")
        captions.append(Caption(str(caption_id), text or "", str(row.get("source") or path.stem),
                                bool(row.get("toxic", toxic)) or toxic))
    return captions


def _read_rows(path: Path) -> list:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        rows = []
        for line_number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CorpusError(f"{path}:{line_number}: not a UTF-8 JSON object ({err})") from None
        return rows
    if path.suffix == ".txt":
        try:
            return [{"text": line} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as err:
            raise CorpusError(f"{path}: not UTF-8 ({err})") from None
    raise CorpusError(f"{path}: unsupported caption file type {path.suffix!r} (use .parquet, .jsonl or .txt)")


def clean_corpus(captions: Iterable[Caption]) -> tuple[list[Caption], dict[str, int]]:
    """Normalise texts, drop empty ones and exact duplicates (first occurrence wins; it becomes
    toxic if any duplicate was). Returns (kept, counts). Raises when an id names two texts or
    nothing is left."""
    kept: dict[str, Caption] = {}
    counts = {"input": 0, "empty_text": 0, "duplicate_text": 0}
    for caption in captions:
        counts["input"] += 1
        text = normalize_text(caption.text)
        if not text:
            counts["empty_text"] += 1
            continue
        if text in kept:
            counts["duplicate_text"] += 1
            if caption.toxic and not kept[text].toxic:
                kept[text] = dataclasses.replace(kept[text], toxic=True)
            continue
        kept[text] = dataclasses.replace(caption, text=text)
    result = list(kept.values())
    seen: dict[str, str] = {}
    for caption in result:
        if caption.caption_id in seen:
            raise CorpusError(f"caption_id {caption.caption_id!r} is used for two different texts: "
                              f"{seen[caption.caption_id]!r} and {caption.text!r}; ids must be unique")
        seen[caption.caption_id] = caption.text
    if not result:
        raise CorpusError(f"empty caption corpus: {counts['input']} rows, {counts['empty_text']} empty after "
                          "normalisation; nothing to index")
    counts["indexed"] = len(result)
    return result, counts


def write_clip_input_tars(captions: list[Caption], out_dir: Path, per_tar: int) -> list[Path]:
    """`corpus-000000.tar`, …: `<row>.txt` = the text, `<row>.json` = {caption_id, source, toxic}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(captions), per_tar):
        path = out_dir / f"corpus-{start // per_tar:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for row, caption in enumerate(captions[start : start + per_tar], start=start):
                meta = {"caption_id": caption.caption_id, "source": caption.source, "toxic": caption.toxic}
                _add(tar, f"{row:09d}.txt", caption.text.encode("utf-8"))
                _add(tar, f"{row:09d}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        paths.append(path)
    return paths


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def read_caption_map(path: Path) -> dict[str, str]:
    """image (relative path, as in the LLaVA "image" field) → caption, from parquet or jsonl."""
    path = Path(path)
    rows = _read_rows(path) if path.suffix in (".parquet", ".jsonl") else None
    if rows is None:
        raise CorpusError(f"{path}: caption map must be .parquet or .jsonl with columns image, caption")
    mapping = {}
    for row_number, row in enumerate(rows):
        if not (isinstance(row, dict) and isinstance(row.get("image"), str) and isinstance(row.get("caption"), str)):
            raise CorpusError(f"{path}: row {row_number} needs string fields image and caption (got {str(row)[:80]})")
        mapping[row["image"]] = normalize_text(row["caption"])
    return mapping


def hash_files(digest, paths) -> None:
    """Feed the bytes of each file (None: absent) into `digest`, one separator after each."""
    for path in paths:
        if path is not None:
            with Path(path).open("rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
        digest.update(b"\0")
