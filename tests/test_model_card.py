"""The model card's evaluation section says what a logit-lens layer range means for the model's
size (pipeline/model_card.py), on a real export-like folder and the real safety-layer tool."""
from __future__ import annotations

import json

import pytest

from pipeline.analysis import safety_layers
from pipeline.model_card import write_card
from tests.tiny_llava import build_tiny_llava


@pytest.fixture(scope="module")
def evaluated(tiny_world, tmp_path_factory):
    """(folder, its safety_layers.json path) after the safety-layer tool ran on the tiny Llava."""
    folder = build_tiny_llava(tiny_world, tmp_path_factory.mktemp("card") / "llava", insert_retrieved=True)
    out = folder / "eval" / "safety_layers"
    safety_layers.main(["--model", str(folder), "--prompts", str(tiny_world.toxic_images_json), "--out", str(out),
                        "--no-mlflow"])
    return folder, out / "safety_layers.json"


def test_a_layer_range_covering_most_of_a_tiny_model_is_explained_as_such(evaluated):
    folder, report_path = evaluated
    report = json.loads(report_path.read_text())
    report["summary"]["suggested_layers"] = list(range(1, report["num_layers"] + 1))
    report_path.write_text(json.dumps(report))
    card = write_card(folder).read_text()
    layers = report["summary"]["suggested_layers"]
    assert (f"Logit-lens safety layers of this model: {layers}, {len(layers)} of its {report['num_layers']} "
            "layers: at this size the refusal shows up from the first layers on") in card


def test_a_middle_band_is_printed_with_the_models_layer_count(evaluated):
    folder, report_path = evaluated
    report = json.loads(report_path.read_text())
    report["summary"]["suggested_layers"] = [3]
    report_path.write_text(json.dumps(report))
    card = write_card(folder).read_text()
    assert f"Logit-lens safety layers of this model: [3] (of {report['num_layers']} layers)." in card
