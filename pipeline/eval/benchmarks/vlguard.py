"""VLGuard's test set (Zong et al., ICML 2024): safe and unsafe pictures with instructions.

Layout of `data/` in github.com/ys-zong/VLGuard (also huggingface.co/datasets/ys-zong/VLGuard):
`test.json`, a list of {"id", "image" (path under the unzipped test.zip), "safe", ["harmful_category",
"harmful_subcategory"], "instr-resp": [...]}, and the pictures unzipped from `test.zip` (the authors'
script reads them from `VLGuard/test/`). The three subsets of the authors' evaluation:

- `unsafes`: unsafe pictures with their instruction (`instr-resp[0].instruction`): refusal expected;
- `safe_unsafes`: safe pictures with an unsafe instruction (`unsafe_instruction`): refusal expected;
- `safe_safes`: safe pictures with a safe instruction (`safe_instruction`): an answer expected, so
  its refusal rate is over-refusal (lower is better).

Scenario: the harmful category for unsafe pictures; for safe ones, the source folder of the picture
(e.g. `bad_ads`). No text twins. The reference answers of the file become the records' gpt turn.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.eval.benchmarks.common import (ANSWER, REFUSAL, BenchmarkError, Item, Selection, check_choice, limited,
                                             require_files, safe_name)

NAME = "vlguard"
SPLITS = {"unsafes": ("instruction", REFUSAL), "safe_unsafes": ("unsafe_instruction", REFUSAL),
          "safe_safes": ("safe_instruction", ANSWER)}
IMAGE_FOLDERS = ("test", "VLGuard/test", "images")


def read(root: Path, selection: Selection, images: Path | None = None) -> tuple[str, list[Item]]:
    meta = next((p for p in (root / "test.json", root / "data" / "test.json") if p.is_file()), None)
    if meta is None:
        raise BenchmarkError(f"{root}: not a VLGuard download: no test.json (github.com/ys-zong/VLGuard, data/)")
    images = images or _image_folder(meta.parent)
    check_choice("split", selection.splits, list(SPLITS), root)
    entries = _entries(meta)
    per_split = {split: [item for entry in entries if (item := _item(split, entry, images, meta)) is not None]
                 for split in selection.splits or tuple(SPLITS)}
    check_choice("scenario", selection.scenarios, sorted({i.scenario for its in per_split.values() for i in its}), meta)
    items = []
    for split, split_items in per_split.items():
        split_items = limited([i for i in split_items if not selection.scenarios or i.scenario in selection.scenarios],
                              selection.limit)
        require_files([i.image_file for i in split_items], f"{split} pictures",
                      f"unzip test.zip so that {images} holds the paths of test.json (or pass --images)")
        items += split_items
    return "github", items


def _entries(meta: Path) -> list[dict]:
    try:
        entries = json.loads(meta.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BenchmarkError(f"{meta}: not valid JSON ({err})") from None
    if not isinstance(entries, list):
        raise BenchmarkError(f"{meta}: expected a list of VLGuard entries")
    for position, entry in enumerate(entries):
        missing = [k for k in ("id", "image", "safe", "instr-resp") if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise BenchmarkError(f"{meta}: entry {position} has no {', '.join(map(repr, missing))}")
    return entries


def _item(split: str, entry: dict, images: Path, meta: Path) -> Item | None:
    """The entry as an item of `split`, or None when it does not belong there (safe vs unsafe picture)."""
    key, expect = SPLITS[split]
    if entry["safe"] == (split == "unsafes"):
        return None
    turns = entry["instr-resp"]
    turn = next((t for t in turns if isinstance(t, dict) and key in t), None)
    if turn is None or not isinstance(turn[key], str) or not turn[key].strip():
        raise BenchmarkError(f"{meta}: entry {entry['id']!r} ({split}) has no {key!r} in instr-resp")
    scenario = entry.get("harmful_category") if split == "unsafes" else Path(entry["image"]).parts[0]
    if not scenario:
        raise BenchmarkError(f"{meta}: unsafe entry {entry['id']!r} has no 'harmful_category'")
    return Item(f"vlguard-{split}-{safe_name(str(entry['id']))}", scenario, split, turn[key].strip(),
                images / entry["image"], None, entry["image"], expect=expect,
                reference=turn.get("response") or "")


def _image_folder(base: Path) -> Path:
    for name in IMAGE_FOLDERS:
        if (base / name).is_dir():
            return base / name
    raise BenchmarkError(f"{base}: no picture folder ({', '.join(IMAGE_FOLDERS)}); unzip test.zip there, "
                         "or pass --images")
