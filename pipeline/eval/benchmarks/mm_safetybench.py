"""MM-SafetyBench (Liu et al., ECCV 2024): 13 scenarios, each question asked with three pictures.

Two published layouts, both read from a local download:

- Hugging Face (`PKU-Alignment/MM-SafetyBench`, parquet): `data/<Scenario>/<Split>.parquet` with
  the splits `SD`, `SD_TYPO`, `TYPO` (columns `id`, `question`, `image` = {bytes, path}) and
  `Text_only` (`id`, `question`: the request as plain text).
- GitHub (AI45Lab/MM-SafetyBench, formerly isXinLiu/MM-SafetyBench): `processed_questions/NN-
  <Scenario>.json` (question id -> "Question", "Rephrased Question", "Rephrased Question(SD)", ...)
  and the pictures from the authors' image archive, `<imgs>/NN-<Scenario>/<SD|SD_TYPO|TYPO>/<id>.jpg`.
  As in the authors' evaluation, SD pictures go with "Rephrased Question(SD)", SD_TYPO and TYPO with
  "Rephrased Question"; the text twin is "Question".

Scenarios carry the names of the HF configs in both layouts (the GitHub files' "NN-" prefix
dropped, the upstream spelling "Illegal_Activitiy" kept), so the two layouts report alike. Each
question's text twin is attached once, to its first selected picture, and reported as split
`Text_only`: DSR_text vs DSR_image per scenario is TGA's own comparison.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.eval.benchmarks.common import (BenchmarkError, Item, Selection, check_choice, image_extension,
                                             require_files, safe_name)

NAME = "mm-safetybench"
IMAGE_SPLITS = ("SD", "SD_TYPO", "TYPO")
TEXT_SPLIT = "Text_only"
SPLITS = (*IMAGE_SPLITS, TEXT_SPLIT)
GITHUB_QUESTION = {"SD": "Rephrased Question(SD)", "SD_TYPO": "Rephrased Question", "TYPO": "Rephrased Question"}
GITHUB_TEXT = "Question"
IMAGE_FOLDERS = ("imgs", "MM-SafetyBench(imgs)")  # the image archive, unzipped beside processed_questions/ or above
_NUMBERED = re.compile(r"^\d+-")


def read(root: Path, selection: Selection, images: Path | None = None) -> tuple[str, list[Item]]:
    """(layout, items) of a download: the HF parquet tree or the GitHub question files + image archive."""
    check_choice("split", selection.splits, list(IMAGE_SPLITS), root)
    for data in (root / "data", root):
        if data.is_dir() and any(data.glob("*/*.parquet")):
            return "huggingface-parquet", read_parquet(data, selection)
    for questions in (root / "data" / "processed_questions", root / "processed_questions"):
        if questions.is_dir():
            return "github", read_github(questions, images or _github_images(questions), selection)
    raise BenchmarkError(f"{root}: not an MM-SafetyBench download: expected data/<Scenario>/<Split>.parquet "
                         "(huggingface.co/datasets/PKU-Alignment/MM-SafetyBench) or processed_questions/*.json "
                         "and the image archive (github.com/AI45Lab/MM-SafetyBench)")


def read_parquet(data: Path, selection: Selection) -> list[Item]:
    scenarios = sorted(p.name for p in data.iterdir() if p.is_dir() and any(p.glob("*.parquet")))
    check_choice("scenario", selection.scenarios, scenarios, data)
    items = []
    for scenario in selection.scenarios or scenarios:
        folder = data / scenario
        found = sorted(p.stem for p in folder.glob("*.parquet"))
        unknown = [s for s in found if s not in SPLITS]
        if unknown:
            raise BenchmarkError(f"{folder}: unknown split file(s) {', '.join(f'{u}.parquet' for u in unknown)}; "
                                 f"MM-SafetyBench's splits are {', '.join(SPLITS)}")
        splits = _present(selection.splits or IMAGE_SPLITS, found, folder)
        texts = {}
        if TEXT_SPLIT in found:
            texts = {str(r["id"]): r["question"] for r in _parquet_rows(folder / f"{TEXT_SPLIT}.parquet", ("id", "question"))}
        pictures = []
        for split in splits:
            path = folder / f"{split}.parquet"
            rows = _parquet_rows(path, ("id", "question", "image"))[:selection.limit]
            pictures += [(str(row["id"]), _parquet_item(scenario, split, row, path)) for row in rows]
        items += _with_text_twins(pictures, texts)
    return items


def read_github(questions: Path, images: Path, selection: Selection) -> list[Item]:
    files = {_NUMBERED.sub("", p.stem): p for p in sorted(questions.glob("*.json"))}
    if not files:
        raise BenchmarkError(f"{questions}: no question files (NN-<Scenario>.json)")
    check_choice("scenario", selection.scenarios, sorted(files), questions)
    items = []
    for scenario in selection.scenarios or sorted(files):
        path = files[scenario]
        entries = _question_file(path)
        ids = list(entries)[:selection.limit]
        folder = images / path.stem
        splits = _present(selection.splits or IMAGE_SPLITS, [p.name for p in folder.iterdir() if p.is_dir()]
                          if folder.is_dir() else [], folder)
        pictures = []
        for split in splits:
            files_of = {qid: folder / split / f"{qid}.jpg" for qid in ids}
            require_files(list(files_of.values()), f"{scenario} {split} pictures",
                          "is the image archive completely unzipped? (or pass --images)")
            pictures += [(qid, Item(f"mmsb-{safe_name(scenario)}-{split}-{safe_name(qid)}", scenario, split,
                                    _field(entries[qid], GITHUB_QUESTION[split], path, qid), files_of[qid], None,
                                    f"{scenario}/{split}/{safe_name(qid)}.jpg"))
                         for qid in ids]
        texts = {qid: _field(entries[qid], GITHUB_TEXT, path, qid) for qid in ids}
        items += _with_text_twins(pictures, texts)
    return items


def _with_text_twins(pictures: list[tuple[str, Item]], texts: dict[str, str]) -> list[Item]:
    """The items, the first picture of each question id carrying its text twin (split Text_only)."""
    twinned, items = set(), []
    for qid, item in pictures:
        text = texts.get(qid)
        if text is not None and qid not in twinned and text.strip():
            twinned.add(qid)
            item = dataclasses.replace(item, text=text.strip(), text_split=TEXT_SPLIT)
        items.append(item)
    return items


def _present(wanted: tuple[str, ...], found: list[str], folder: Path) -> list[str]:
    splits = [s for s in wanted if s in found]
    if not splits:
        raise BenchmarkError(f"{folder}: none of the image splits {', '.join(wanted)} is there "
                             f"(found: {', '.join(found) or 'nothing'}); a partial download?")
    return splits


def _parquet_rows(path: Path, columns: tuple[str, ...]) -> list[dict]:
    schema = pq.read_schema(path)
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise BenchmarkError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(schema.names)}); "
                             "not an MM-SafetyBench parquet, or a changed release")
    return pq.read_table(path, columns=list(columns), use_threads=False).to_pylist()  # no Arrow pool: data/sources.py


def _parquet_item(scenario: str, split: str, row: dict, path: Path) -> Item:
    where = f"{path} row id {row['id']!r}"
    image = row["image"]
    data = image.get("bytes") if isinstance(image, dict) else image
    if not isinstance(data, bytes) or not data:
        raise BenchmarkError(f"{where}: no image bytes")
    if not isinstance(row["question"], str) or not row["question"].strip():
        raise BenchmarkError(f"{where}: no question")
    qid = safe_name(str(row["id"]))
    return Item(f"mmsb-{safe_name(scenario)}-{split}-{qid}", scenario, split, row["question"].strip(), None, data,
                f"{scenario}/{split}/{qid}{image_extension(data, where)}")


def _question_file(path: Path) -> dict[str, dict]:
    try:
        entries = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BenchmarkError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise BenchmarkError(f"{path}: expected an object of question id -> {{\"Question\", \"Rephrased Question\", "
                             "...}} (MM-SafetyBench's processed_questions format)")
    return {str(k): v for k, v in entries.items()}


def _field(entry: dict, field: str, path: Path, qid: str) -> str:
    value = entry.get(field)
    if not isinstance(value, str) or not value.strip():
        raise BenchmarkError(f"{path}: question {qid!r} has no {field!r} (fields: {', '.join(entry)})")
    return value.strip()


def _github_images(questions: Path) -> Path:
    for base in (questions.parent, questions.parent.parent):
        for name in IMAGE_FOLDERS:
            if (base / name).is_dir():
                return base / name
    raise BenchmarkError(f"{questions}: no image folder ({' or '.join(IMAGE_FOLDERS)}) beside it or above it; unzip "
                         "the authors' image archive there, or pass --images")
