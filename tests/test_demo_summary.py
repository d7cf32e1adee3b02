"""The table `make demo` ends with (pipeline/demo_summary.py) reads the tools' own reports: the
numbers in it are the ones in their summary.json files, the chart and summary.md are written, and
each pointer names a file that exists."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.demo_summary import main, summarize
from pipeline.eval import ability, dsr


def _dsr_rows(refusals: dict[tuple[str, str], list[bool]]) -> list[dict]:
    """samples.jsonl-like rows: (concept, modality) -> one verdict per record."""
    return [{"id": f"{concept}-{i}", "concept": concept, "modality": modality, "refused": refused,
             "answered_toxic": None}
            for (concept, modality), verdicts in refusals.items() for i, refused in enumerate(verdicts)]


def _write(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


@pytest.fixture
def work(tmp_path) -> Path:
    """A work/ folder laid out as `make demo` leaves it, with reports in the tools' formats."""
    work = tmp_path / "work"
    _write(work / "export/stage2-hf/tga_training.json", {"tga_layers": [2, 3]})
    evals = work / "eval/stage2"
    _write(evals / "dsr/summary.json", dsr.summarize(_dsr_rows({
        ("glorbium", "image"): [True, True, False, True], ("glorbium", "text"): [True] * 4,
        ("zentrox", "image"): [False, False, True, True], ("zentrox", "text"): [True, True, True, False]})))
    _write(evals / "over_refusal/summary.json", dsr.summarize(_dsr_rows({
        ("benign", "image"): [False, False, False, True, False], ("benign", "text"): [False] * 5})))
    _write(evals / "ability/summary.json", ability.summarize([
        {"question_type": "colour", "exact_match": 1.0, "token_f1": 1.0},
        {"question_type": "count", "exact_match": 0.0, "token_f1": 0.5}]))
    _write(evals / "alignment/alignment.json", {"layers": {str(layer): {"mean": layer / 10} for layer in range(1, 5)}})
    _write(work / "runs/stage2/mlflow.db", {})
    return work


def test_the_summary_table_holds_the_numbers_of_the_tools_reports(work):
    text = summarize(work)
    lines = text.splitlines()
    # 5 of 8 toxic pictures refused, 7 of 8 texts; 1 of 5 benign pictures; F1 (1 + 0.5) / 2;
    # cosine mean over the TGA layers 2 and 3
    for row in (f"| DSR image | {5 / 8:.3f} | refused share of the 8 toxic pictures' requests |",
                f"| DSR text | {7 / 8:.3f} |", f"| gap (text − image) | {7 / 8 - 5 / 8:.3f} |",
                f"| over-refusal (image) | {1 / 5:.3f} | refused share of the same questions about 5 benign pictures |",
                f"| ability token F1 | {0.75:.3f} | 2 held-out VQA questions |",
                f"| cosine at the TGA layers | {(0.2 + 0.3) / 2:.3f} | toxic picture vs its caption, mean over layers 2, 3 |"):
        assert any(line.startswith(row) for line in lines), row
    assert (work / "eval/stage2/summary.md").read_text() == text + "\n"


def test_the_summary_points_at_the_concept_chart_and_the_mlflow_store_it_found(work):
    text = summarize(work)
    chart = work / "eval/stage2/dsr_by_concept.png"
    assert chart.read_bytes().startswith(b"\x89PNG")
    assert f"Plots: {chart}" in text
    store = (work / "runs/stage2/mlflow.db").resolve()
    assert f".venv/bin/python -m mlflow ui --backend-store-uri sqlite:///{store}" in text
    assert "Model card:" not in text  # no README.md in the export: nothing to point at


def test_a_tool_that_did_not_run_shows_a_dash_and_no_reports_at_all_is_refused(work, tmp_path, capsys):
    (work / "eval/stage2/over_refusal/summary.json").unlink()
    assert "| over-refusal (image) | — |" in summarize(work)
    with pytest.raises(SystemExit, match="holds no dsr/ or ability/ summary.json; run `make demo` first"):
        main(["--work", str(tmp_path / "empty")])
