"""LLaVA-format records (blip_laion_cc_sbu_558k.json, llava_v1_5_mix665k.json, or JSONL) → samples.

A record is `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}`;
`image` is a path relative to the image root (nested folders as in "coco/train2017/x.jpg"), and
records without it are text-only chats (mix665k has ~40K). Problems of one record become a
`Reject` with a reason from `REASONS`, so the caller can count it and go on; only a file that
cannot be read as a whole (missing, not UTF-8 JSON array) raises `LlavaInputError`.

Everything here is pure except `read_records`; image files are checked later, in the packer.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Literal

from pipeline.conventions import IMAGE_TOKEN, Reject

# Every reason a record can be rejected for; rejects.parquet and stats.json use these strings.
REASONS = (
    "not_utf8",                       # JSONL line that is not UTF-8
    "malformed_json",                 # JSONL line that is not JSON
    "not_an_object",                  # record is not a JSON object
    "missing_id",                     # no "id", or not a non-empty string/number
    "duplicate_id",                   # same key as an earlier record
    "missing_conversations",          # no "conversations", or not a non-empty list
    "bad_conversations",              # a turn is not {"from": human|gpt, "value": str} / roles do not alternate
    "image_token_missing",            # image sample whose conversation has no <image>
    "image_token_repeated",           # <image> more than once in the conversation
    "image_token_not_in_first_turn",  # <image> in a later turn
    "image_token_without_image",      # text-only record that still has <image>
    "bad_image_path",                 # "image" is not a relative path inside the image root
    "missing_image",                  # image file does not exist (packer)
    "unreadable_image",               # image file cannot be decoded (packer)
    "no_embedding",                   # clip-retrieval produced no embedding for the image (join)
)

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


class LlavaInputError(ValueError):
    """The input file as a whole cannot be used; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class RawRecord:
    """One input record before validation: `position` is its 0-based index in the file."""
    position: int
    value: Any = None
    error: str | None = None        # "not_utf8" | "malformed_json" when the line could not be parsed
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class LlavaSample:
    key: str                  # tar-safe, unique in the dataset (see `sample_key`)
    id: str                   # the record's own id, as written in the file
    position: int
    image: str | None         # relative path under the image root; None for text-only
    conversations: list[dict]


def read_records(path: Path) -> list[RawRecord]:
    """All records of a `.json` (one array) or `.jsonl` file, in file order.

    A JSON array must parse as a whole (a broken array has no trustworthy record boundaries);
    a JSONL file is read line by line and bad lines come back as errors, not exceptions.
    """
    path = Path(path)
    if not path.is_file():
        raise LlavaInputError(f"{path}: LLaVA input file not found")
    data = path.read_bytes()
    if path.suffix == ".jsonl":
        return [_parse_line(position, line) for position, line in enumerate(_jsonl_lines(data))]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LlavaInputError(f"{path}: not UTF-8 (byte {err.start}); LLaVA JSON must be UTF-8") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise LlavaInputError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg} "
                              "(a .json input must be one array; use .jsonl for one record per line)") from None
    if not isinstance(value, list):
        raise LlavaInputError(f"{path}: top level is {type(value).__name__}, expected a JSON array of records")
    return [RawRecord(position, record) for position, record in enumerate(value)]


def _jsonl_lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    return [line for line in lines if line.strip()]


def _parse_line(position: int, line: bytes) -> RawRecord:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return RawRecord(position, error="not_utf8", detail=f"invalid byte at {err.start}")
    try:
        return RawRecord(position, json.loads(text))
    except json.JSONDecodeError as err:
        return RawRecord(position, error="malformed_json", detail=f"{err.msg} at column {err.colno}")


def sample_key(record_id: str) -> str:
    """Tar-safe key of a record id: no dots (WebDataset splits the extension at the first dot),
    no slashes; anything else outside [A-Za-z0-9_-] becomes "_". "GCC_train_00.1" → "GCC_train_00_1"."""
    return _UNSAFE_KEY_CHARS.sub("_", record_id)


def position_key(position: int) -> str:
    """Key of a record that has no usable id (it only appears in rejects.parquet)."""
    return f"record-{position:09d}"


def validate_records(raw: Iterable[RawRecord],
                     duplicate_ids: Literal["reject", "suffix"] = "reject") -> list[LlavaSample | Reject]:
    """Validate records in file order; keys are unique over the whole list.

    `duplicate_ids="reject"` rejects every record whose key was already taken (the first one wins);
    `"suffix"` keeps it as `<key>_dup<n>`, for files that reuse an id for different conversations.
    """
    taken: dict[str, int] = {}
    out: list[LlavaSample | Reject] = []
    for record in raw:
        result = validate_record(record)
        if isinstance(result, LlavaSample):
            count = taken.get(result.key, 0)
            taken[result.key] = count + 1
            if count and duplicate_ids == "reject":
                result = Reject("duplicate_id", f"id {result.id!r} (key {result.key}) already used by an earlier "
                                "record", key=result.key, position=record.position)
            elif count:
                new_key = f"{result.key}_dup{count}"
                while new_key in taken:  # an id in the file may already look like a suffixed one
                    count += 1
                    new_key = f"{result.key}_dup{count}"
                taken[new_key] = 1
                result = dataclasses.replace(result, key=new_key)
        out.append(result)
    return out


def validate_record(record: RawRecord) -> LlavaSample | Reject:
    """One record → a sample, or a reject naming the first problem found."""
    position = record.position
    if record.error:
        return Reject(record.error, record.detail, key=position_key(position), position=position)
    value = record.value
    if not isinstance(value, dict):
        return Reject("not_an_object", f"got {type(value).__name__}", key=position_key(position), position=position)
    record_id = value.get("id")
    if isinstance(record_id, int) and not isinstance(record_id, bool):
        record_id = str(record_id)
    if not isinstance(record_id, str) or not record_id.strip():
        return Reject("missing_id", f"id is {record_id!r}", key=position_key(position), position=position)
    key = sample_key(record_id)

    def reject(reason: str, detail: str) -> Reject:
        return Reject(reason, detail, key=key, position=position)

    conversations = value.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return reject("missing_conversations", f"conversations is {_short(conversations)}")
    problem = _conversation_problem(conversations)
    if problem:
        return reject("bad_conversations", problem)

    image = value.get("image")
    image_turns = [i for i, turn in enumerate(conversations) for _ in range(turn["value"].count(IMAGE_TOKEN))]
    if image is None:
        if image_turns:
            return reject("image_token_without_image", f"{IMAGE_TOKEN} in turn {image_turns[0]} but no image")
        return LlavaSample(key, record_id, position, None, conversations)
    if not isinstance(image, str) or not _is_relative_inside(image):
        return reject("bad_image_path", f"image {image!r} must be a relative path inside the image root")
    if not image_turns:
        return reject("image_token_missing", f"no {IMAGE_TOKEN} in the conversation of image {image}")
    if len(image_turns) > 1:
        return reject("image_token_repeated", f"{IMAGE_TOKEN} appears {len(image_turns)} times")
    if image_turns[0] != 0:
        return reject("image_token_not_in_first_turn", f"{IMAGE_TOKEN} is in turn {image_turns[0]}")
    return LlavaSample(key, record_id, position, image, conversations)


def _conversation_problem(conversations: list) -> str | None:
    """LLaVA's training code assumes human, gpt, human, gpt, ...; anything else mislabels answers."""
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return f"turn {i} is not {{'from': ..., 'value': str}}: {_short(turn)}"
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            return f"turn {i} is from {turn.get('from')!r}, expected {expected!r} (roles must alternate, human first)"
    if len(conversations) < 2:
        return "no gpt answer"
    if len(conversations) % 2:
        return f"turn {len(conversations) - 1} is a human turn without an answer"
    return None


def _is_relative_inside(image: str) -> bool:
    path = PurePosixPath(image)
    return bool(image.strip()) and not path.is_absolute() and ".." not in path.parts and "\\" not in image


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_answer(conversations: list[dict]) -> str:
    """The first gpt turn: for LCS-558K this is the image's caption."""
    return conversations[1]["value"].strip()


def estimate_tokens(conversations: list[dict], extra_text: str = "") -> int:
    """Rough text-token count (≈ 4/3 tokens per whitespace word, LLaMA-like tokenizers on English),
    without image tokens: used to bucket samples by length, never to cut them."""
    words = sum(len(turn["value"].split()) for turn in conversations) + len(extra_text.split())
    return math.ceil(words * 4 / 3)
