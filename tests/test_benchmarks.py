"""pipeline/eval/benchmarks: the readers on tiny-world twins of each published layout (tests/benchmark_twins.py):
counts, splits, scenario names, questions, text twins, what each split expects, the records the
retrieval join accepts, and one clear line for each kind of broken download."""
from __future__ import annotations

import csv
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.llava import RawRecord, Reject, validate_records
from pipeline.eval.benchmarks import BenchmarkError, Selection, figstep, mm_safetybench, prepare, vlguard
from pipeline.eval.benchmarks.__main__ import main as benchmarks_main
from tests.benchmark_twins import FIGSTEP_TOPICS, MMSB_SCENARIOS, VLGUARD_CATEGORIES, mmsb_question, write_twins


@pytest.fixture(scope="module")
def twins(tiny_world, tmp_path_factory):
    return write_twins(tiny_world, tmp_path_factory.mktemp("twins"), per_scenario=2)


@pytest.fixture(scope="module")
def toxic(tiny_world):
    return json.loads(tiny_world.toxic_images_json.read_text())


def _prepared(name, data, out, selection=Selection()):
    info = prepare(name, data, out, selection)
    return info, json.loads((out / "records.json").read_text())


@pytest.mark.parametrize("layout", ["mmsb_parquet", "mmsb_github"])
def test_mm_safetybench_reads_13_scenario_layout_into_three_image_splits_and_one_text_twin_per_question(
        twins, toxic, tmp_path, layout):
    info, records = _prepared("mm-safetybench", getattr(twins, layout), tmp_path / "out")
    n = twins.per_scenario
    assert info["layout"] == {"mmsb_parquet": "huggingface-parquet", "mmsb_github": "github"}[layout]
    assert info["splits"] == {"SD": 2 * n, "SD_TYPO": 2 * n, "TYPO": 2 * n}
    assert info["scenarios"] == {s: 3 * n for s in sorted(MMSB_SCENARIOS)} and info["records"] == 6 * n
    twinned = [r for r in records if "text" in r]
    assert info["text_twins"] == len(twinned) == 2 * n  # each question's text asked once, not per picture
    assert {(r["split"], r["text_split"]) for r in twinned} == {("SD", "Text_only")}
    by_id = {r["id"]: r for r in records}
    for s, scenario in enumerate(MMSB_SCENARIOS):
        for qid in range(n):
            for split in ("SD", "SD_TYPO", "TYPO"):
                record = by_id[f"mmsb-{scenario}-{split}-{qid}"]
                assert record["conversations"][0]["value"] == "<image>\n" + mmsb_question(toxic, s, qid, split)
                assert record["concept"] == scenario and record["expect"] == "refusal"
                assert (tmp_path / "out" / "images" / record["image"]).read_bytes()[:2] == b"\xff\xd8"  # the JPEG
            assert by_id[f"mmsb-{scenario}-SD-{qid}"]["text"] == toxic[s * 12 + qid * 3]["text"]


def test_both_mm_safetybench_layouts_give_the_same_records_and_pictures(twins, tmp_path):
    _, parquet = _prepared("mm-safetybench", twins.mmsb_parquet, tmp_path / "hf")
    _, github = _prepared("mm-safetybench", twins.mmsb_github, tmp_path / "gh")
    assert parquet == github
    for record in parquet:
        assert (tmp_path / "hf" / "images" / record["image"]).read_bytes() == \
            (tmp_path / "gh" / "images" / record["image"]).read_bytes()


def test_records_are_what_the_retrieval_join_accepts(twins, tmp_path):
    for name, data in (("mm-safetybench", twins.mmsb_parquet), ("figstep", twins.figstep), ("vlguard", twins.vlguard)):
        _, records = _prepared(name, data, tmp_path / name)
        samples = validate_records([RawRecord(i, r) for i, r in enumerate(records)], "reject")
        assert not [s for s in samples if isinstance(s, Reject)] and len(samples) == len(records)


def test_figstep_asks_every_typographic_picture_with_the_fixed_prompt_and_the_question_as_text(twins, tmp_path):
    info, records = _prepared("figstep", twins.figstep, tmp_path / "fs")
    assert info["splits"] == {"SafeBench": 2 * twins.per_scenario}
    assert info["scenarios"] == {name: twins.per_scenario for _, name in FIGSTEP_TOPICS}
    assert {r["conversations"][0]["value"] for r in records} == {"<image>\n" + figstep.PROMPT}
    with (twins.figstep / "data" / "question" / "safebench.csv").open() as f:
        assert [r["text"] for r in records] == [row["question"] for row in csv.DictReader(f)]
    assert {r["text_split"] for r in records} == {"SafeBench"}
    assert records[0]["image"] == "SafeBench/query_ForbidQI_1_1_6.png"
    info, _ = _prepared("figstep", twins.figstep, tmp_path / "tiny", Selection(splits=("SafeBench-Tiny",)))
    assert info["splits"] == {"SafeBench-Tiny": len(FIGSTEP_TOPICS)}


def test_vlguard_splits_expect_refusals_on_unsafe_instructions_and_answers_on_safe_ones(twins, tmp_path):
    info, records = _prepared("vlguard", twins.vlguard, tmp_path / "vl")
    n = twins.per_scenario
    assert info["splits"] == {"safe_safes": n, "safe_unsafes": n, "unsafes": len(VLGUARD_CATEGORIES) * n}
    assert info["expect"] == {"safe_safes": "answer", "safe_unsafes": "refusal", "unsafes": "refusal"}
    assert {r["concept"] for r in records if r["split"] == "unsafes"} == set(VLGUARD_CATEGORIES)
    assert {r["concept"] for r in records if r["split"] != "unsafes"} == {"bad_ads"}  # the safe pictures' source
    safe = [r for r in records if r["split"] == "safe_safes"]
    assert safe[0]["conversations"] == [{"from": "human", "value": "<image>\nWhat colour is the background?"},
                                        {"from": "gpt", "value": "It is purple."}]
    assert not any("text" in r for r in records)  # VLGuard has no text twins


def test_limit_scenarios_and_splits_select_a_smoke_subset(twins, tmp_path):
    info, records = _prepared("mm-safetybench", twins.mmsb_parquet, tmp_path / "s",
                              Selection(scenarios=("HateSpeech",), splits=("TYPO", "SD"), limit=1))
    assert info["splits"] == {"SD": 1, "TYPO": 1} and info["scenarios"] == {"HateSpeech": 2}
    assert [r["split"] for r in records if "text" in r] == ["TYPO"]  # the twin goes to the first selected split
    info, _ = _prepared("vlguard", twins.vlguard, tmp_path / "v", Selection(scenarios=("deception",)))
    assert info["splits"] == {"unsafes": twins.per_scenario}


def test_the_command_line_writes_the_folder_and_names_an_unknown_scenario(twins, tmp_path, capsys):
    info = benchmarks_main(["figstep", "--data", str(twins.figstep), "--out", str(tmp_path / "o"), "--limit", "1"])
    assert info["records"] == len(FIGSTEP_TOPICS) and "figstep (github): 2 records" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"unknown scenario 'Fraud'; this download has Hate Speech, Illegal Activity"):
        benchmarks_main(["figstep", "--data", str(twins.figstep), "--out", str(tmp_path / "o"), "--scenarios", "Fraud"])


# ---- broken downloads: one line naming the file and what is missing ---------------------------------

def _copy(source, tmp_path):
    return shutil.copytree(source, tmp_path / "copy", symlinks=False)


def test_missing_pictures_are_counted_and_the_first_named(twins, tmp_path):
    root = _copy(twins.mmsb_github, tmp_path)
    (root / "imgs" / "02-HateSpeech" / "TYPO" / "1.jpg").unlink()
    with pytest.raises(BenchmarkError, match=r"1 of 2 HateSpeech TYPO pictures missing: .*02-HateSpeech/TYPO/1.jpg; "
                                             "is the image archive completely unzipped"):
        prepare("mm-safetybench", root, tmp_path / "o")
    root = _copy(twins.figstep, tmp_path / "f")
    (root / "data" / "images" / "SafeBench" / "query_ForbidQI_2_2_6.png").unlink()
    with pytest.raises(BenchmarkError, match=r"1 of 4 SafeBench pictures missing: .*query_ForbidQI_2_2_6.png"):
        prepare("figstep", root, tmp_path / "o")


def test_a_wrong_split_file_or_column_names_the_file(twins, tmp_path):
    root = _copy(twins.mmsb_parquet, tmp_path)
    (root / "data" / "HateSpeech" / "TYPO.parquet").rename(root / "data" / "HateSpeech" / "Typo.parquet")
    with pytest.raises(BenchmarkError, match=r"HateSpeech: unknown split file\(s\) Typo.parquet; MM-SafetyBench's "
                                             "splits are SD, SD_TYPO, TYPO, Text_only"):
        prepare("mm-safetybench", root, tmp_path / "o")
    (root / "data" / "HateSpeech" / "Typo.parquet").unlink()
    pq.write_table(pa.table({"id": [0], "prompt": ["q"]}), root / "data" / "HateSpeech" / "SD.parquet")
    with pytest.raises(BenchmarkError, match=r"SD.parquet: no column 'question', 'image' \(columns: id, prompt\)"):
        prepare("mm-safetybench", root, tmp_path / "o")
    with pytest.raises(BenchmarkError, match="unknown split 'SD_TYPOS'"):
        prepare("mm-safetybench", twins.mmsb_parquet, tmp_path / "o", Selection(splits=("SD_TYPOS",)))


def test_vlguard_without_its_pictures_or_instructions_is_refused(twins, tmp_path):
    root = _copy(twins.vlguard, tmp_path)
    shutil.rmtree(root / "test")
    with pytest.raises(BenchmarkError, match=r"no picture folder \(test, VLGuard/test, images\); unzip test.zip"):
        prepare("vlguard", root, tmp_path / "o")
    entries = json.loads((twins.vlguard / "test.json").read_text())
    entries[-1]["instr-resp"] = [{"safe_instruction": "ok?", "response": "yes"}]
    root = _copy(twins.vlguard, tmp_path / "b")
    (root / "test.json").write_text(json.dumps(entries))
    with pytest.raises(BenchmarkError, match=r"entry 'Priv_1' \(safe_unsafes\) has no 'unsafe_instruction'"):
        prepare("vlguard", root, tmp_path / "o")


def test_a_folder_of_another_benchmark_is_named_as_such(twins, tmp_path):
    with pytest.raises(BenchmarkError, match="not an MM-SafetyBench download"):
        prepare("mm-safetybench", twins.figstep, tmp_path / "o")
    with pytest.raises(BenchmarkError, match="not a VLGuard download: no test.json"):
        prepare("vlguard", twins.mmsb_github, tmp_path / "o")
    assert mm_safetybench.NAME == "mm-safetybench" and vlguard.NAME == "vlguard"
