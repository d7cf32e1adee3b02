"""Eval records -> queries: which question goes to the model, with which image and retrieved text.

Eval data is LLaVA-format JSON (an array) or JSONL: `{"id", "image", "conversations": [{from:
human, value: "<image>\\n..."}, {from: gpt, value}], ...}` plus fields a tool groups by (the
toxic scene/concept for DSR, the question type for the ability score) and, for DSR, `text`: the
same request given as text. Image paths are relative to an image root; the tiny world lays its
data out as `ROOT/eval/<file>.json` next to `ROOT/images/`, which is the default root.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pipeline.conventions import IMAGE_TOKEN

IMAGE = "image"
TEXT = "text"


class EvalDataError(ValueError):
    """Eval data that cannot be used; the message names the file, the sample and the fix."""


@dataclasses.dataclass(frozen=True)
class Query:
    id: str
    group: str                    # DSR: the scene/concept; ability: the question type
    modality: str                 # IMAGE or TEXT
    question: str                 # the user turn as in the data ("<image>\n..." for image queries)
    image: Path | None            # None for text queries
    retrieved_text: str | None    # inserted as "Retrieved Text: {..}. " before the image; None = none
    reference: str | None = None  # the expected answer (ability)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON array or a JSONL file; every record must be an object with an id."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: eval data file not found")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            records = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvalDataError(f"{path}: not valid JSON ({err}); expected a LLaVA-format array (or .jsonl)") from None
    if not isinstance(records, list) or not records:
        raise EvalDataError(f"{path}: expected a non-empty array of LLaVA-format records")
    seen = set()
    for position, record in enumerate(records):
        if not isinstance(record, dict) or record.get("id") in (None, ""):
            raise EvalDataError(f"{path}: record {position} is not an object with an 'id'")
        if str(record["id"]) in seen:
            raise EvalDataError(f"{path}: id {record['id']!r} appears twice; ids must be unique")
        seen.add(str(record["id"]))
    return records


def default_image_root(data: str | Path) -> Path:
    """`DATA_DIR/../images`: the tiny world's layout (eval/toxic_images.json, images/toxic/...)."""
    return Path(data).resolve().parent.parent / "images"


def first_turns(record: dict, source: Path) -> tuple[str, str | None]:
    """(first human turn, first gpt answer or None) of a record."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict) \
            or turns[0].get("from") != "human" or not isinstance(turns[0].get("value"), str):
        raise EvalDataError(f"{source}: record {record['id']!r}: 'conversations' must start with a "
                            "{from: human, value: str} turn")
    answer = turns[1].get("value") if len(turns) > 1 and isinstance(turns[1], dict) else None
    return turns[0]["value"].strip(), answer if isinstance(answer, str) else None


def group_of(record: dict, fields: tuple[str, ...], source: Path) -> str:
    """The first of `fields` the record has: its group (concept, scene, question type)."""
    for field in fields:
        value = record.get(field)
        if value not in (None, ""):
            return str(value)
    raise EvalDataError(f"{source}: record {record['id']!r} has none of the fields {', '.join(fields)}; "
                        "name the field that holds its group with the tool's field option")


def image_query(record: dict, *, group: str, image_root: Path, retrieved_text: str | None,
                source: Path, image_token: str = IMAGE_TOKEN) -> Query:
    """The record's first human turn with its image; its gpt answer becomes the reference."""
    question, answer = first_turns(record, source)
    if question.count(image_token) != 1 or not record.get("image"):
        raise EvalDataError(f"{source}: record {record['id']!r}: an image query needs an 'image' field "
                            f"and exactly one {image_token} in the first human turn")
    image = image_root / record["image"]
    if not image.is_file():
        raise EvalDataError(f"{source}: record {record['id']!r}: image {image} not found; is --images "
                            f"the folder its 'image' paths are relative to? (now {image_root})")
    return Query(str(record["id"]), group, IMAGE, question, image, retrieved_text, answer)


def text_query(record: dict, *, group: str, field: str = "text") -> Query | None:
    """The record's request as plain text (`text` field), or None when it has none."""
    value = record.get(field)
    if not isinstance(value, str) or not value.strip():
        return None
    return Query(str(record["id"]), group, TEXT, value.strip(), None, None)
