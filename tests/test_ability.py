"""General ability: answer scoring, the held-out benign VQA of the tiny world, and the CLI."""
from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from pipeline.eval import ability
from pipeline.eval.generation import Generation
from pipeline.eval.queries import EvalDataError, Query
from tests.tiny_llava import build_tiny_llava

QUESTION_TYPES = {"background", "caption", "colour", "count", "position", "shape", "yes_no"}


def test_answers_are_normalised_like_squad_before_scoring():
    assert ability.normalize_answer("  The Background is BLUE! ") == "background is blue"
    assert ability.exact_match("the background is blue", "The background is blue.") == 1.0
    assert ability.exact_match("The background is red.", "The background is blue.") == 0.0
    assert ability.token_f1("The background is red.", "The background is blue.") == pytest.approx(2 / 3)
    assert ability.token_f1("blue", "The background is blue.") == pytest.approx(0.5)  # p 1, r 1/3
    assert ability.token_f1("Sorry, I cannot help.", "There are two objects.") == 0.0
    assert ability.token_f1("", "") == 1.0 and ability.token_f1("", "a red circle") == 0.0


def test_scores_per_question_type_on_canned_answers(tmp_path):
    answers = {"q1": "The background is blue.", "q2": "blue", "q3": "There are three objects."}
    queries = [Query("q1", "background", "image", "?", None, None, "The background is blue."),
               Query("q2", "background", "image", "?", None, None, "The background is blue."),
               Query("q3", "count", "image", "?", None, None, "There are two objects.")]
    rows = ability.score_queries(queries, lambda qs: [Generation("p", answers[q.id]) for q in qs])
    summary = ability.summarize(rows)
    assert summary["by_type"]["background"] == pytest.approx({"exact_match": 0.5, "token_f1": 0.75, "n": 2})
    assert summary["by_type"]["count"] == pytest.approx({"exact_match": 0.0, "token_f1": 0.75, "n": 1})
    assert summary["exact_match"] == pytest.approx(1 / 3) and summary["token_f1"] == pytest.approx(0.75)
    assert ability.metrics_of(summary)["background/exact_match"] == 0.5


def test_the_benign_vqa_set_is_held_out_from_every_training_record_and_image(tiny_world):
    records = json.loads(tiny_world.benign_vqa_json.read_text())
    assert tiny_world.benign_vqa_json == tiny_world.root / "eval" / "benign_vqa.json"
    assert len({r["id"] for r in records}) == len(records) >= 100
    assert {r["question_type"] for r in records} == QUESTION_TYPES
    training_images = {r.get("image") for path in (tiny_world.stage1_json, tiny_world.stage2_json)
                       for r in json.loads(path.read_text())}
    for record in records:
        assert record["image"].startswith("heldout/") and record["image"] not in training_images
        assert (tiny_world.images / record["image"]).is_file()
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["from"] == "gpt"


def test_records_without_a_reference_answer_are_refused(tiny_world):
    record = {"id": "x", "image": "heldout/000000.jpg", "question_type": "count",
              "conversations": [{"from": "human", "value": "<image>\nHow many?"}]}
    with pytest.raises(EvalDataError, match="record 'x' has no reference answer"):
        ability.ability_queries([record], type_fields=("question_type",), image_root=tiny_world.images,
                                source="f.json", retrieved=None)


@pytest.fixture(scope="module")
def model(tiny_world, tmp_path_factory):
    return build_tiny_llava(tiny_world, tmp_path_factory.mktemp("ability") / "llava", insert_retrieved=False)


def test_cli_scores_a_tiny_llava_folder_and_logs_a_run_of_its_own(tiny_world, model, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "ability"
    summary = ability.main(["--model", str(model), "--data", str(tiny_world.benign_vqa_json), "--out", str(out),
                            "--limit", "7", "--max-new-tokens", "8", "--mlflow-uri", uri])
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and {r["question_type"] for r in rows} == QUESTION_TYPES  # one scene, every type
    assert all("Retrieved Text" not in r["prompt"] for r in rows)
    assert summary["token_f1"] == pytest.approx(sum(r["token_f1"] for r in rows) / 7)
    assert json.loads((out / "summary.json").read_text())["run"]["insert_retrieved"] == "False"

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tga-eval").experiment_id])
    assert run.info.run_name == "ability" and run.data.tags["tga.tool"] == "ability"
    assert run.data.metrics["token_f1"] == pytest.approx(summary["token_f1"])
    assert "count/exact_match" in run.data.metrics and run.data.params["samples"] == "7"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"samples.jsonl", "summary.json"}


def test_cli_refuses_a_folder_whose_tokenizer_is_not_the_models(tiny_world, model, tmp_path):
    folder = tmp_path / "mismatched"
    shutil.copytree(model, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(40)])
    tokenizer.save_pretrained(folder)
    with pytest.raises(SystemExit, match="ability error: .*the tokenizer has .* tokens but the model embeds only"):
        ability.main(["--model", str(folder), "--data", str(tiny_world.benign_vqa_json), "--out", str(tmp_path / "o"),
                      "--no-mlflow"])


def test_cli_refuses_a_folder_that_is_not_a_llava_model(tiny_world, tmp_path):
    with pytest.raises(SystemExit, match="ability error: .*model_type 'llama' is not a Llava model"):
        ability.main(["--model", str(tiny_world.llm), "--data", str(tiny_world.benign_vqa_json), "--out",
                      str(tmp_path), "--no-mlflow"])
