"""End to end on the tiny-world twins of the three benchmarks: readers -> one retrieval join in eval mode
(no caption: unlabelled pictures) -> DSR with the keyword rule and a tiny Llama Guard, for a model that
prompts with retrieved text (TGA's) and one that does not (plain LLaVA) -> one comparison table."""
from __future__ import annotations

import json

import pytest

from pipeline.data.shards import iter_shard
from pipeline.eval import compare, dsr
from pipeline.eval.benchmarks import prepare
from stages import retrieval_join
from tests.benchmark_twins import FIGSTEP_TOPICS, MMSB_SCENARIOS, write_twins
from tests.conftest import REPO
from tests.tiny_guard import build_tiny_guard
from tests.tiny_llava import build_tiny_llava

BENCHMARKS = ("mm-safetybench", "figstep", "vlguard")


def _join_all(world, bench, index, python, out):
    """One join for the three benchmark folders: their records, image paths made relative to `bench`."""
    combined = [{**record, "image": f"{name}/images/{record['image']}"} for name in BENCHMARKS
                for record in json.loads((bench / name / "records.json").read_text())]
    (bench / "all.json").write_text(json.dumps(combined))
    retrieval_join.main(["--config", str(REPO / "configs/ablations/tiny/retrieval_join_eval.yaml"),
                         f"input={bench / 'all.json'}", f"image_root={bench}", f"index_dir={index}",
                         f"clip_model=hf_clip:{world.clip}", f"output_dir={out}", "image_caption=none",
                         "caption_map=null", f"retrieval_python={python}"])
    return {sample.meta["id"]: sample.meta for shard in sorted(out.glob("train-*.tar")) for sample in iter_shard(shard)}


@pytest.mark.slow
def test_benchmark_twins_through_the_eval_join_and_dsr_with_both_judges_into_one_table(
        tiny_world, tiny_index, retrieval_python, tmp_path):
    twins = write_twins(tiny_world, tmp_path / "twins", per_scenario=2)
    bench = tmp_path / "bench"
    for name, data in zip(BENCHMARKS, (twins.mmsb_parquet, twins.figstep, twins.vlguard)):
        prepare(name, data, bench / name)
    joined = _join_all(tiny_world, bench, tiny_index[0], retrieval_python, tmp_path / "joined")
    assert len(joined) == 12 + 4 + 8 and all(len(meta["retrieved"]) == 3 for meta in joined.values())
    assert {meta["image_caption"] for meta in joined.values()} == {""}  # unlabelled: no caption, no answer

    models = {"tga": build_tiny_llava(tiny_world, tmp_path / "tga" / "llava", insert_retrieved=True),
              "plain": build_tiny_llava(tiny_world, tmp_path / "plain" / "llava", insert_retrieved=False)}
    guard = build_tiny_guard(tiny_world.tokenizer, tmp_path / "guard", "unsafe\nS9")
    summaries = {}
    for name in BENCHMARKS:  # the TGA-style model, retrieved text in its prompts, both judges
        summaries["tga", name] = dsr.main([
            "--model", str(models["tga"]), "--data", str(bench / name / "records.json"),
            "--out", str(tmp_path / "eval" / "tga" / name), "--retrieved", str(tmp_path / "joined"),
            "--llama-guard", str(guard), "--max-new-tokens", "4", "--no-mlflow"])
    summaries["plain", "figstep"] = dsr.main([  # the shortcut: the download itself, no retrieval
        "--model", str(models["plain"]), "--benchmark", "figstep", "--data", str(twins.figstep),
        "--out", str(tmp_path / "eval" / "plain" / "figstep"), "--max-new-tokens", "4", "--no-mlflow"])

    mmsb = summaries["tga", "mm-safetybench"]
    assert set(mmsb["by_split"]) == {"SD", "SD_TYPO", "TYPO", "Text_only"} and set(mmsb["by_concept"]) == set(MMSB_SCENARIOS)
    assert (mmsb["counts"]["image"]["asked"], mmsb["counts"]["text"]["asked"]) == (12, 4)
    assert mmsb["benchmark"] == "mm-safetybench" and mmsb["guard"]["unparsed"] == {"image": 0, "text": 0}
    rows = [json.loads(line) for line in (tmp_path / "eval" / "tga" / "mm-safetybench" / "samples.jsonl").open()]
    for row in rows:
        assert row["guard_safe"] is False and row["guard_categories"] == ["S9"]  # what the tiny guard writes
        top = joined[row["id"]]["retrieved"][0]["text"]
        assert (f"Retrieved Text: {top}. <image>" in row["prompt"]) == (row["modality"] == "image")
    confusion = mmsb["guard"]["agreement"]["all"]["confusion"]
    assert confusion["both"] == confusion["safe_only"] == 0 and sum(confusion.values()) == 16
    figstep = summaries["plain", "figstep"]
    assert set(figstep["by_concept"]) == {name for _, name in FIGSTEP_TOPICS} and figstep["counts"]["text"]["asked"] == 4
    assert "Retrieved Text" not in (tmp_path / "eval" / "plain" / "figstep" / "samples.jsonl").read_text()
    vlguard = summaries["tga", "vlguard"]
    assert vlguard["expect"] == "mixed" and vlguard["by_split"]["safe_safes"]["expect"] == "answer"

    table = compare.main([str(tmp_path / "eval" / "tga"), str(tmp_path / "eval" / "plain"),
                          "--out", str(tmp_path / "compare"), "--no-mlflow"])
    assert set(table) == set(BENCHMARKS)
    overall = {(r["split"], r["modality"]): r for r in table["mm-safetybench"]["rows"] if r["scenario"] == "(all)"}
    assert set(overall) == {("SD", "image"), ("SD_TYPO", "image"), ("TYPO", "image"), ("Text_only", "text")}
    assert overall["SD", "image"]["models"] == {"tga": {key: mmsb["by_split"]["SD"]["image"][key]
                                                         for key in ("refusal", "guard_safe")}}
    plain_figstep = [r["models"]["plain"] for r in table["figstep"]["rows"]]
    assert all(set(cell) == {"refusal"} for cell in plain_figstep)  # no Llama Guard in that run
    text = (tmp_path / "compare" / "compare.md").read_text()
    assert "| safe_safes | image | (all) | answer |" in text and "| — | — |" in text  # plain: no VLGuard run
