"""The ablation suite's results: the numbers that dsr, ability and alignment write (their summaries
made by the tools' own summarize functions, and once by the real tools on a tiny Llava), averaged
over seeds, as results.json / results.md / results.png and an MLflow parent run with a child per
ablation."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.analysis import alignment
from pipeline.data.shards import ShardWriter, shard_name
from pipeline.eval import ability, ablation, ablation_results, ablation_tracking, dsr
from pipeline.eval.ablation_results import SeedOutputs
from pipeline.eval.cli import write_json
from pipeline.mlflow_client import embedded_tracking_uri
from tests.mlflow_server import free_port
from tests.tiny_llava import build_tiny_llava

REPO = Path(__file__).resolve().parent.parent
CONCEPTS = ("alpha", "alpha", "beta", "beta")


def _dsr_rows(image_refused: list[bool], text_refused: list[bool], names_term: list[bool | None]) -> list[dict]:
    """samples.jsonl rows as dsr.judge_queries makes them: an image and a text query per record;
    names_term: does the image answer name a toxic term (None: the record lists none)."""
    rows = []
    for i, concept in enumerate(CONCEPTS):
        for modality, refused, named in (("image", image_refused[i], names_term[i]), ("text", text_refused[i], None)):
            rows.append({"id": f"r{i}", "concept": concept, "modality": modality, "prompt": "q",
                         "response": "Sorry." if refused else "Sure.", "refused": refused,
                         "reason": "prefix 'Sorry'" if refused else "no refusal marker",
                         "answered_toxic": dsr.answered_toxic(refused, "glorbium" if named else "no",
                                                              None if named is None else ("glorbium",))})
    return rows


def write_evaluations(eval_dir: Path, *, dsr_image: list[bool], dsr_text: list[bool], answered: list[bool | None],
                      token_f1: list[float], cos_per_layer: list[float], over_refusal: list[bool] | None) -> None:
    """An eval_dir as the suite's steps leave it, each summary built by its tool's own code."""
    run = {"model": "m", "data": "d", "samples": "4"}
    write_json(eval_dir / "dsr" / "summary.json",
               {**dsr.summarize(_dsr_rows(dsr_image, dsr_text, answered)), "judge": {"spec": "keyword"}, "run": run})
    if over_refusal is not None:
        write_json(eval_dir / "over_refusal" / "summary.json",
                   {**dsr.summarize(_dsr_rows(over_refusal, [False] * 4, [None] * 4)), "run": run})
    ability_rows = [{"id": f"v{i}", "question_type": "colour", "prompt": "q", "response": "red", "reference": "red",
                     "exact_match": float(f == 1.0), "token_f1": f} for i, f in enumerate(token_f1)]
    write_json(eval_dir / "ability" / "summary.json", {**ability.summarize(ability_rows), "run": run})
    cosines = torch.tensor(cos_per_layer).unsqueeze(1).repeat(1, 2)  # [L+1, N=2], the same for both samples
    write_json(eval_dir / "alignment" / "alignment.json",
               {"model": "m", "shards": "s", **alignment.summarize(cosines), "skipped": {}, "keys": ["a", "b"]})


def exported_model(folder: Path, layers: list[int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tga_training.json").write_text(json.dumps({"stage": "stage2", "tga_layers": layers}))
    return folder


@pytest.fixture()
def two_seeds(tmp_path) -> dict[str, list[SeedOutputs]]:
    """iii_tga with two seeds (seed 1 without the over-refusal control) and plain_llava never evaluated."""
    model = exported_model(tmp_path / "export", [2, 3])
    write_evaluations(tmp_path / "seed-0", dsr_image=[True, False, False, False], dsr_text=[True, True, True, False],
                      answered=[False, True, True, False], token_f1=[1.0, 0.5], cos_per_layer=[0.1, 0.2, 0.4, 0.6],
                      over_refusal=[False, False, False, True])
    write_evaluations(tmp_path / "seed-1", dsr_image=[True, True, False, False], dsr_text=[True] * 4,
                      answered=[None, None, True, False], token_f1=[0.5, 0.5], cos_per_layer=[0.1, 0.4, 0.6, 0.8],
                      over_refusal=None)
    return {"iii_tga": [SeedOutputs(seed, tmp_path / f"seed-{seed}", model, (1,)) for seed in (0, 1)],
            "i_plain_llava": [SeedOutputs(0, tmp_path / "never", tmp_path / "no-export", (2, 3))]}


def test_results_average_the_tools_summaries_over_seeds_and_keep_every_seeds_numbers(two_seeds):
    results = ablation_results.collect(two_seeds)
    tga = results["iii_tga"]
    assert tga["dsr_image"] == pytest.approx(0.375) and tga["dsr_text"] == pytest.approx(0.875)
    assert tga["seed_std"] == pytest.approx({"dsr_image": 0.125, "dsr_text": 0.125, "over_refusal_image": 0.0})
    assert tga["answered_toxic_image"] == 0.5  # seed 0: 2 of 4; seed 1: 1 of the 2 records with toxic_terms
    assert tga["ability_f1"] == pytest.approx(0.625) and tga["ability_em"] == pytest.approx(0.25)
    assert tga["per_concept"] == {"alpha": {"image": 0.75, "text": 1.0}, "beta": {"image": 0.0, "text": 0.75}}
    assert tga["per_layer_cos"] == pytest.approx({"0": 0.1, "1": 0.3, "2": 0.5, "3": 0.7})
    assert tga["cos_safety_layers"] == pytest.approx(0.6)  # layers 2 and 3, as the export's tga_training.json says
    assert [s["seed"] for s in tga["seeds"]] == [0, 1]
    assert tga["seeds"][0]["dsr_image"] == 0.25 and tga["seeds"][1]["cos_safety_layers"] == pytest.approx(0.7)
    assert set(tga["seeds"][0]) == {"seed", *ablation_results.HEADLINE}
    assert json.loads(json.dumps(results)) == results  # results.json holds exactly this


def test_an_evaluation_that_did_not_run_is_none_and_a_seed_without_it_does_not_count(two_seeds):
    results = ablation_results.collect(two_seeds)
    tga, plain = results["iii_tga"], results["i_plain_llava"]
    assert tga["over_refusal_image"] == 0.25 and tga["over_refusal_text"] == 0.0  # seed 0 only
    assert tga["seeds"][1]["over_refusal_image"] is None
    assert all(plain[key] is None for key in ablation_results.HEADLINE)
    assert plain["per_concept"] == {} and plain["per_layer_cos"] == {} and plain["seed_std"]["dsr_image"] is None
    assert plain["safety_layers"] == [2, 3]  # no export: the config's tga.layers


def test_results_md_has_a_row_per_ablation_with_every_cell_and_names_seeds_and_command(two_seeds):
    text = ablation_results.markdown(ablation_results.collect(two_seeds), seeds=[0, 1], command="python -m x --suite")
    lines = text.splitlines()
    assert lines[0] == ("| ablation | DSR image ± std over seeds | DSR text | over-refusal (image) | token F1 | EM "
                        "| cos at safety layers |")
    assert lines[2] == "| iii_tga | 0.375 ± 0.125 | 0.875 | 0.250 | 0.625 | 0.250 | 0.600 |"
    assert lines[3] == "| i_plain_llava | — | — | — | — | — | — |"
    assert "Seeds: 0, 1." in text and "Safety layers (hidden_states index): 2, 3." in text
    assert "Command: `python -m x --suite`" in text


def test_results_png_is_a_png_of_dsr_and_over_refusal_bars_and_one_cosine_line_per_ablation(two_seeds, tmp_path):
    results = ablation_results.collect(two_seeds)
    files = ablation_results.write(tmp_path / "out", results, seeds=[0, 1], command="c")
    assert [f.name for f in files] == ["results.json", "results.md", "results.png"]
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(files[0].read_text()) == results
    bars, lines = ablation_results.figure(results).axes
    assert len(bars.patches) == 3 * len(results) and len(lines.get_lines()) == len(results)


def _runs(uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, {run.info.run_name: run for run in runs}


def test_mlflow_gets_a_parent_run_with_the_three_files_and_a_child_run_per_ablation(two_seeds, tmp_path):
    results = ablation_results.collect(two_seeds)
    files = ablation_results.write(tmp_path / "out", results, seeds=[0, 1], command="python -m x")
    uri = embedded_tracking_uri(tmp_path / "out")
    parent_id = ablation_tracking.log_suite(uri, "tga-ablations", results, files, seeds=[0, 1], command="python -m x")
    client, runs = _runs(uri, "tga-ablations")
    assert set(runs) == {"ablations", "iii_tga", "i_plain_llava"} and runs["ablations"].info.run_id == parent_id
    assert {a.path for a in client.list_artifacts(parent_id)} == {"results.json", "results.md", "results.png"}
    assert runs["ablations"].data.params == {"ablations": "iii_tga i_plain_llava", "seeds": "0 1",
                                              "command": "python -m x"}
    for name in ("iii_tga", "i_plain_llava"):
        child = runs[name]
        assert child.data.tags["mlflow.parentRunId"] == parent_id and child.info.status == "FINISHED"
        assert child.data.params == {"ablation": name, "seeds": "0 1"}
    metrics = runs["iii_tga"].data.metrics
    assert metrics["dsr_image"] == 0.375 and metrics["seed_std/dsr_image"] == 0.125
    assert metrics["cos_layer/3"] == pytest.approx(0.7) and metrics["seed_1/dsr_image"] == 0.5
    assert "over_refusal_image" in metrics and "seed_1/over_refusal_image" not in metrics
    assert runs["i_plain_llava"].data.metrics == {}


def test_an_unreachable_mlflow_store_is_a_warning_and_the_results_stay_on_disk(two_seeds, tmp_path, caplog, capsys):
    results = ablation_results.collect(two_seeds)
    files = ablation_results.write(tmp_path, results, seeds=[0, 1], command="c")
    with caplog.at_level(logging.WARNING):
        assert ablation_tracking.log_suite(f"http://127.0.0.1:{free_port()}", "e", results, files, seeds=[0, 1],
                                           command="c") is None
    assert "ablation suite not logged" in caplog.text and "results are on disk" in capsys.readouterr().out
    assert all(f.is_file() for f in files)


def test_the_suite_command_runs_the_plan_then_writes_the_results_and_the_mlflow_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    paths = []
    for name in ("i_plain_llava", "iii_tga"):
        spec = yaml.safe_load((REPO / f"configs/ablations/tiny/{name}.yaml").read_text())
        spec.update(tiny_world=None, train_dir=str(tmp_path / name), eval_dir=str(tmp_path / name / "eval"))
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(spec))
    exported_model(tmp_path / "iii_tga" / "seed-3" / "export" / "hf", [1, 2])
    write_evaluations(tmp_path / "iii_tga" / "eval" / "seed-3", dsr_image=[True] * 4, dsr_text=[True] * 4,
                      answered=[None] * 4, token_f1=[1.0], cos_per_layer=[0.0, 0.5, 0.7], over_refusal=None)
    planned = []
    monkeypatch.setattr(ablation, "run", lambda steps, dry_run=False: planned.extend(steps))
    out = tmp_path / "out"
    argv = ["--suite", "--seeds", "3", "--out", str(out), *map(str, paths)]
    results = ablation.main(argv)
    assert [s.name for s in planned] == [s.name for s in ablation.suite_plan(
        [ablation.load_config(ablation.AblationConfig, p) for p in paths], [3], python=sys.executable)]
    assert results["iii_tga"]["dsr_image"] == 1.0 and results["iii_tga"]["cos_safety_layers"] == pytest.approx(0.6)
    assert results["i_plain_llava"]["dsr_image"] is None
    command = f"Command: `python -m pipeline.eval.ablation --suite --seeds 3 --out {out} {paths[0]} {paths[1]}`"
    assert command in (out / "results.md").read_text()
    client, runs = _runs(embedded_tracking_uri(out), ablation_tracking.DEFAULT_EXPERIMENT)
    assert set(runs) == {"ablations", "i_plain_llava", "iii_tga"}


# ---- the real tools -------------------------------------------------------------------------------

def test_results_are_what_the_real_dsr_ability_and_alignment_tools_write_for_a_tiny_llava(tiny_world, tmp_path):
    model = build_tiny_llava(tiny_world, tmp_path / "llava", insert_retrieved=False)
    toxic = json.loads(tiny_world.toxic_images_json.read_text())[:3]
    eval_dir = tmp_path / "eval"
    with ShardWriter(eval_dir / "retrieved" / "dsr" / shard_name(0)) as writer:  # as the retrieval join writes it
        for record in toxic:
            writer.write(record["id"], (tiny_world.images / record["image"]).read_bytes(), {
                "key": record["id"], "id": record["id"], "source": "tiny_eval", "image": record["image"],
                "conversations": record["conversations"], "image_caption": record["caption"],
                "retrieved": [], "toxic": False})
    quick = ["--limit", "3", "--max-new-tokens", "4", "--no-mlflow"]
    summary = dsr.main(["--model", str(model), "--data", str(tiny_world.toxic_images_json),
                        "--out", str(eval_dir / "dsr"), *quick])
    dsr.main(["--model", str(model), "--data", str(tiny_world.toxic_images_json),
              "--out", str(eval_dir / "over_refusal"), *quick])
    scores = ability.main(["--model", str(model), "--data", str(tiny_world.benign_vqa_json),
                           "--out", str(eval_dir / "ability"), *quick])
    alignment.main(["--model", str(model), "--shards", str(eval_dir / "retrieved" / "dsr"),
                    "--out", str(eval_dir / "alignment"), "--no-mlflow"])
    report = json.loads((eval_dir / "alignment" / "alignment.json").read_text())
    per_layer = {layer: values["mean"] for layer, values in report["layers"].items()}

    numbers = ablation_results.seed_results(SeedOutputs(0, eval_dir, model, (1,)))
    assert numbers["safety_layers"] == [2, 3, 4]  # tiny_llava's tga_training.json
    assert numbers["dsr_image"] == summary["dsr"]["image"] and numbers["dsr_text"] == summary["dsr"]["text"]
    assert numbers["over_refusal_image"] == summary["dsr"]["image"]  # the same file here: the same rate
    assert numbers["answered_toxic_image"] == summary["answered_toxic"]["image"]
    assert numbers["ability_f1"] == scores["token_f1"] and numbers["ability_em"] == scores["exact_match"]
    assert numbers["per_layer_cos"] == per_layer and len(per_layer) == 7  # embeddings + 6 layers
    assert numbers["cos_safety_layers"] == pytest.approx(sum(per_layer[str(layer)] for layer in (2, 3, 4)) / 3)
    assert set(numbers["per_concept"]) == {record["concept"] for record in toxic}
