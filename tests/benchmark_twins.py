"""Tiny-world twins of the published benchmark layouts, written by the tests (the repository holds no
benchmark data): the exact file layout, names, columns and JSON shapes of each download
(docs/evaluation.md says which source each was checked against), filled with the tiny world's
pictures and requests.

- MM-SafetyBench, Hugging Face parquet: data/<Scenario>/{SD,SD_TYPO,TYPO,Text_only}.parquet
- MM-SafetyBench, GitHub: processed_questions/NN-<Scenario>.json + imgs/NN-<Scenario>/<split>/<id>.jpg
- FigStep: data/question/{safebench,SafeBench-Tiny}.csv + data/images/<split>/query_ForbidQI_<c>_<t>_6.png
- VLGuard: test.json + test/<source>/<name>.png
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

# Two of the real scenario / topic / category names of each benchmark (spelling as published).
MMSB_SCENARIOS = ("Illegal_Activitiy", "HateSpeech")
FIGSTEP_TOPICS = ((1, "Illegal Activity"), (2, "Hate Speech"))
VLGUARD_CATEGORIES = ("deception", "privacy")


@dataclasses.dataclass(frozen=True)
class Twins:
    mmsb_parquet: Path
    mmsb_github: Path
    figstep: Path
    vlguard: Path
    per_scenario: int        # questions per scenario (MM-SafetyBench, FigStep's SafeBench) / per VLGuard kind


def write_twins(world, root: Path, per_scenario: int = 2) -> Twins:
    """All four twins under `root`, `per_scenario` questions per scenario, from the world's toxic
    pictures (requests about them) and held-out benign pictures (VLGuard's safe images)."""
    toxic = json.loads(world.toxic_images_json.read_text())
    benign = json.loads(world.benign_requests_json.read_text())
    twins = Twins(root / "mmsb-hf", root / "mmsb-github", root / "figstep", root / "vlguard", per_scenario)
    _mmsb_parquet(twins.mmsb_parquet, world.images, toxic, per_scenario)
    _mmsb_github(twins.mmsb_github, world.images, toxic, per_scenario)
    _figstep(twins.figstep, world.images, toxic, per_scenario)
    _vlguard(twins.vlguard, world.images, toxic, benign, per_scenario)
    return twins


def mmsb_pictures(toxic: list[dict], scenario_index: int, qid: int) -> dict[str, dict]:
    """The tiny-world record whose picture stands for each split of one MM-SafetyBench question."""
    base = scenario_index * 12 + qid * 3
    return {split: toxic[base + i] for i, split in enumerate(("SD", "SD_TYPO", "TYPO"))}


def mmsb_question(toxic: list[dict], scenario_index: int, qid: int, split: str) -> str:
    """As upstream: SD pictures have a question of their own ("Rephrased Question(SD)"), SD_TYPO and
    TYPO share one ("Rephrased Question")."""
    pictures = mmsb_pictures(toxic, scenario_index, qid)
    return f"{_question(pictures['SD'])} (SD)" if split == "SD" else f"{_question(pictures['SD_TYPO'])} (typography)"


def _question(record: dict) -> str:
    return record["conversations"][0]["value"].removeprefix("<image>\n")


def _mmsb_parquet(root: Path, images: Path, toxic: list[dict], n: int) -> None:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for s, scenario in enumerate(MMSB_SCENARIOS):
        folder = root / "data" / scenario
        folder.mkdir(parents=True)
        for split in ("SD", "SD_TYPO", "TYPO"):
            records = [mmsb_pictures(toxic, s, qid)[split] for qid in range(n)]
            pq.write_table(pa.table({
                "id": pa.array(range(n), pa.int64()),
                "question": [mmsb_question(toxic, s, qid, split) for qid in range(n)],
                "image": pa.array([{"bytes": (images / r["image"]).read_bytes(), "path": f"{qid}.jpg"}
                                   for qid, r in enumerate(records)], image_type)}), folder / f"{split}.parquet")
        pq.write_table(pa.table({"id": pa.array(range(n), pa.int64()),
                                 "question": [mmsb_pictures(toxic, s, qid)["SD"]["text"] for qid in range(n)]}),
                       folder / "Text_only.parquet")


def _mmsb_github(root: Path, images: Path, toxic: list[dict], n: int) -> None:
    (root / "processed_questions").mkdir(parents=True)
    for s, scenario in enumerate(MMSB_SCENARIOS):
        stem = f"{s + 1:02d}-{scenario}"
        entries = {}
        for qid in range(n):
            pictures = mmsb_pictures(toxic, s, qid)
            entries[str(qid)] = {"Question": pictures["SD"]["text"], "Changed Question": pictures["SD"]["text"],
                                 "Key Phrase": pictures["SD"]["concept"], "Phrase Type": "activity",
                                 "Rephrased Question": mmsb_question(toxic, s, qid, "SD_TYPO"),
                                 "Rephrased Question(SD)": mmsb_question(toxic, s, qid, "SD")}
            for split, record in pictures.items():
                target = root / "imgs" / stem / split / f"{qid}.jpg"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes((images / record["image"]).read_bytes())
        (root / "processed_questions" / f"{stem}.json").write_text(json.dumps(entries, indent=4))


def _figstep(root: Path, images: Path, toxic: list[dict], n: int) -> None:
    (root / "data" / "question").mkdir(parents=True)
    columns = ["dataset", "category_id", "task_id", "category_name", "question", "instruction"]
    for split, file, count in (("SafeBench", "safebench.csv", n), ("SafeBench-Tiny", "SafeBench-Tiny.csv", 1)):
        rows = []
        for c, (category_id, name) in enumerate(FIGSTEP_TOPICS):
            for task in range(1, count + 1):
                record = toxic[40 + c * 8 + task]
                rows.append(["ForbidQI", category_id, task, name, record["text"],
                             f"Steps to make {record['concept']}."])
                target = root / "data" / "images" / split / f"query_ForbidQI_{category_id}_{task}_6.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.open(images / record["image"]).save(target, format="PNG")
        with (root / "data" / "question" / file).open("w", newline="") as f:
            csv.writer(f).writerows([columns, *rows])


def _vlguard(root: Path, images: Path, toxic: list[dict], benign: list[dict], n: int) -> None:
    entries = []
    for c, category in enumerate(VLGUARD_CATEGORIES):
        for i in range(n):
            record = toxic[56 + c * 4 + i]
            name = f"bad_ads/unsafe-{c}-{i}.png"
            _png(images / record["image"], root / "test" / name)
            entries.append({"id": f"Ads_{c}{i}", "image": name, "safe": False, "harmful_category": category,
                            "harmful_subcategory": "disinformation",
                            "instr-resp": [{"instruction": _question(record), "response": "I'm sorry, I cannot."}]})
    for i in range(n):
        record = benign[i]
        name = f"bad_ads/safe-{i}.png"
        _png(images / record["image"], root / "test" / name)
        entries.append({"id": f"Priv_{i}", "image": name, "safe": True, "instr-resp": [
            {"safe_instruction": "What colour is the background?", "response": "It is purple."},
            {"unsafe_instruction": _question(record), "response": "I'm sorry, I cannot help with that."}]})
    (root / "test.json").write_text(json.dumps(entries))


def _png(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.open(source).save(buffer, format="PNG")
    target.write_bytes(buffer.getvalue())
