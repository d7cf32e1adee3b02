"""pipeline/eval/compare.py (and the statistics of pipeline/eval/stats.py it prints): models side by side per
benchmark, split and scenario, every rate with its Wilson interval, the judges' agreement, files and MLflow."""
from __future__ import annotations

import json
import math

import pytest

from pipeline.eval import compare
from pipeline.eval.cli import write_json, write_jsonl
from pipeline.eval.dsr_summary import summarize
from pipeline.eval.stats import agreement, rate, wilson

Z = 1.959963984540054  # the 97.5% normal quantile


def wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return centre - half, centre + half


def test_wilson_intervals_follow_the_score_formula_and_stay_inside_0_1():
    for k, n in ((0, 5), (2, 5), (5, 5), (13, 40)):
        assert wilson(k, n) == pytest.approx(wilson_by_hand(k, n))
        low, high = wilson(k, n)
        assert 0 <= low <= k / n <= high <= 1 and high > low
    assert wilson(0, 0) is None and rate(0, 0) == {"rate": None, "ci": None, "k": 0, "n": 0}
    assert rate(3, 4)["rate"] == 0.75 and rate(3, 4)["ci"] == pytest.approx(list(wilson_by_hand(3, 4)))


def test_kappa_is_cohens_on_the_confusion_counts_and_undefined_when_both_judges_are_constant():
    first = [True, True, True, False, False, True, False, True]
    second = [True, False, True, False, True, True, False, True]
    result = agreement(first, second, ("refused", "safe"))
    assert result["confusion"] == {"both": 4, "refused_only": 1, "safe_only": 1, "neither": 2}
    observed, p1, p2 = 6 / 8, 5 / 8, 5 / 8
    chance = p1 * p2 + (1 - p1) * (1 - p2)
    assert result["kappa"] == pytest.approx((observed - chance) / (1 - chance)) and result["n"] == 8
    assert agreement([True] * 3, [True] * 3, ("a", "b"))["kappa"] is None
    assert agreement([], [], ("a", "b")) == {"kappa": None, "n": 0, "confusion": {"both": 0, "a_only": 0,
                                                                                  "b_only": 0, "neither": 0}}


def _rows(image_refused: list[bool], guard_safe: list[bool | None]) -> list[dict]:
    """samples.jsonl rows of a 4-question benchmark: split SD (image) and its text twins (Text_only)."""
    rows = []
    for i, (refused, safe) in enumerate(zip(image_refused, guard_safe)):
        scenario = ("Fraud", "HateSpeech")[i % 2]
        for modality, split, refusal in (("image", "SD", refused), ("text", "Text_only", True)):
            rows.append({"id": f"q{i}", "concept": scenario, "modality": modality, "split": split,
                         "expect": "refusal", "prompt": "p", "response": "r", "refused": refusal, "reason": "",
                         "answered_toxic": None, "guard_safe": safe if modality == "image" else True,
                         "guard_categories": [], "guard_output": "safe"})
    return rows


def _evaluation(folder, rows, benchmark="mm-safetybench"):
    write_jsonl(folder / "samples.jsonl", rows)
    write_json(folder / "summary.json", {**summarize(rows), "benchmark": benchmark, "run": {"data": "x.json"}})


@pytest.fixture()
def two_models(tmp_path):
    _evaluation(tmp_path / "tga" / "mmsb", _rows([True, True, True, False], [True, True, False, None]))
    _evaluation(tmp_path / "plain" / "mmsb", _rows([False, False, True, False], [False, True, True, False]))
    return tmp_path


def test_table_puts_each_split_and_scenario_of_each_model_side_by_side_with_intervals(two_models):
    result = compare.main([str(two_models / "tga"), str(two_models / "plain"), "--out", str(two_models / "out"),
                           "--no-mlflow"])
    rows = result["mm-safetybench"]["rows"]
    assert [(r["split"], r["modality"], r["scenario"]) for r in rows] == [
        ("SD", "image", "(all)"), ("SD", "image", "Fraud"), ("SD", "image", "HateSpeech"),
        ("Text_only", "text", "(all)"), ("Text_only", "text", "Fraud"), ("Text_only", "text", "HateSpeech")]
    tga, plain = rows[0]["models"]["tga"], rows[0]["models"]["plain"]
    assert (tga["refusal"]["k"], tga["refusal"]["n"], plain["refusal"]["k"]) == (3, 4, 1)
    assert tga["guard_safe"]["k"] == 2 and tga["guard_safe"]["n"] == 3  # the unparsed verdict is left out
    low, high = wilson_by_hand(3, 4)
    table = (two_models / "out" / "compare.md").read_text()
    assert f"| SD | image | (all) | refusal | 0.75 [{low:.2f}, {high:.2f}] (3/4) |" in table
    assert "Agreement of the judges for tga (queries expecting a refusal): kappa" in table
    on_disk = json.loads((two_models / "out" / "compare.json").read_text())
    assert on_disk["models"] == ["tga", "plain"] and on_disk["benchmarks"]["mm-safetybench"]["rows"] == rows
    assert (two_models / "out" / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_the_comparison_is_logged_as_an_mlflow_run(two_models):
    from mlflow import MlflowClient

    compare.main([str(two_models / "tga"), str(two_models / "plain"), "--out", str(two_models / "out"),
                  "--names", "TGA", "plain LLaVA"])
    client = MlflowClient(f"sqlite:///{two_models / 'out' / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name(compare.DEFAULT_EXPERIMENT).experiment_id])[0]
    assert run.data.metrics["TGA/mm-safetybench/SD/image/refusal"] == 0.75
    assert run.data.metrics["plain_LLaVA/mm-safetybench/Text_only/text/guard_safe"] == 1.0
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"compare.md", "compare.json", "compare.png"}


def test_folders_without_dsr_outputs_or_with_clashing_names_are_refused(two_models, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="compare error: .*empty: no DSR output below it"):
        compare.main([str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--no-mlflow"])
    _evaluation(two_models / "tga" / "again", _rows([True] * 4, [True] * 4))
    with pytest.raises(SystemExit, match="two evaluations of benchmark 'mm-safetybench'"):
        compare.main([str(two_models / "tga"), "--out", str(tmp_path / "o"), "--no-mlflow"])
    with pytest.raises(SystemExit):
        compare.main([str(two_models / "plain"), str(two_models / "plain"), "--out", str(tmp_path / "o")])
