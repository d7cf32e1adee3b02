"""What every benchmark reader returns, and how a selection of it becomes DSR eval records on disk.

A reader turns a benchmark's own published layout into `Item`s: one question about one picture,
with the benchmark's scenario (the DSR concept), its split (image type or subset), what a safe
model should do (`refusal`, or `answer` for over-refusal controls), and the same request as text
when the benchmark has a text twin. `write_records` then writes the DSR format
(docs/evaluation.md): `records.json` (LLaVA-format records, the gpt turn the benchmark's reference
answer or empty), `images/` (pictures the benchmark stores as files are linked, never copied;
pictures stored as bytes in parquet are written out), and `benchmark.json` (what was read, from
where, counts per split and scenario). The retrieval join and the DSR tool read that folder like any
eval file.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from collections import Counter
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pipeline.conventions import IMAGE_TOKEN
from pipeline.eval.queries import EvalDataError

REFUSAL, ANSWER = "refusal", "answer"   # what a safe model does with the item
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_-]+")


class BenchmarkError(EvalDataError):
    """A benchmark download that cannot be read: the message names the file and what is missing."""


@dataclasses.dataclass(frozen=True)
class Item:
    id: str                       # unique in the benchmark; letters, digits, '-', '_'
    scenario: str                 # the DSR concept: MM-SafetyBench scenario, FigStep topic, VLGuard category
    split: str                    # image type (SD, TYPO, ...) or subset (unsafes, safe_safes, ...)
    question: str                 # asked with the picture
    image_file: Path | None       # the picture as a file of the download ...
    image_bytes: bytes | None     # ... or as bytes (parquet); exactly one of the two
    image_name: str               # relative path under images/ (extension included)
    text: str | None = None       # the same request as plain text (the text twin), if the benchmark has one
    text_split: str | None = None  # the split the text twin belongs to (MM-SafetyBench: Text_only)
    expect: str = REFUSAL
    reference: str = ""           # the benchmark's reference answer, if it has one


@dataclasses.dataclass(frozen=True)
class Selection:
    scenarios: tuple[str, ...] = ()   # empty: all
    splits: tuple[str, ...] = ()      # empty: the benchmark's default splits
    limit: int | None = None          # at most this many questions per split and scenario

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise BenchmarkError("--limit must be >= 1")


def safe_name(text: str) -> str:
    """A name part for ids and image paths: anything outside [A-Za-z0-9_-] becomes '_'."""
    return _SAFE_NAME.sub("_", text.strip()).strip("_") or "_"


def check_choice(kind: str, wanted: tuple[str, ...], available: list[str], source: Path) -> None:
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise BenchmarkError(f"{source}: unknown {kind} {', '.join(map(repr, unknown))}; this download has "
                             f"{', '.join(sorted(available)) or 'none'}")


def limited(items: list[Item], limit: int | None) -> list[Item]:
    """The first `limit` items of each (split, scenario), in reading order."""
    if limit is None:
        return items
    seen: Counter = Counter()
    kept = []
    for item in items:
        seen[item.split, item.scenario] += 1
        if seen[item.split, item.scenario] <= limit:
            kept.append(item)
    return kept


def require_files(paths: list[Path], what: str, hint: str) -> None:
    """One line for a partial download: how many of `paths` are missing, the first few named."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise BenchmarkError(f"{len(missing)} of {len(paths)} {what} missing: {shown}{more}; {hint}")


def record_of(item: Item, benchmark: str) -> dict:
    record = {"id": item.id, "image": item.image_name, "concept": item.scenario, "split": item.split,
              "expect": item.expect, "benchmark": benchmark,
              "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{item.question}"},
                                {"from": "gpt", "value": item.reference}]}
    if item.text is not None:
        record["text"] = item.text
        record["text_split"] = item.text_split or item.split
    return record


def write_records(items: list[Item], out: Path, *, benchmark: str, layout: str, source: Path) -> dict:
    """records.json, images/ and benchmark.json in `out`; returns benchmark.json's content."""
    if not items:
        raise BenchmarkError(f"{source}: the selection is empty (check --scenarios / --splits / --limit)")
    duplicates = [i for i, n in Counter(item.id for item in items).items() if n > 1]
    if duplicates:
        raise BenchmarkError(f"{source}: ids {duplicates[:3]} appear twice; the download holds duplicate rows")
    images = out / "images"
    for item in items:
        _place_image(item, images / item.image_name)
    records = [record_of(item, benchmark) for item in items]
    (out / "records.json").write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    info = {"benchmark": benchmark, "layout": layout, "source": str(source), "records": len(records),
            "text_twins": sum(r.get("text") is not None for r in records),
            "splits": dict(sorted(Counter(item.split for item in items).items())),
            "scenarios": dict(sorted(Counter(item.scenario for item in items).items())),
            "expect": dict(sorted({item.split: item.expect for item in items}.items()))}
    (out / "benchmark.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _place_image(item: Item, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    if item.image_file is not None:
        os.symlink(item.image_file.resolve(), target)
        return
    try:  # a row whose bytes are no picture is a broken download: said now, not at generation
        Image.open(io.BytesIO(item.image_bytes)).verify()
    except (UnidentifiedImageError, OSError) as err:
        raise BenchmarkError(f"{item.id}: its image bytes are not a readable picture ({err})") from None
    target.write_bytes(item.image_bytes)


def image_extension(data: bytes, where: str) -> str:
    """'.jpg' / '.png' / ... from the picture's own bytes (a parquet row carries no reliable name)."""
    try:
        kind = Image.open(io.BytesIO(data)).format
    except (UnidentifiedImageError, OSError) as err:
        raise BenchmarkError(f"{where}: the image bytes are not a readable picture ({err})") from None
    return {"JPEG": ".jpg"}.get(kind, f".{kind.lower()}")
