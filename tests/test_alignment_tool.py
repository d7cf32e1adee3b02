"""Per-layer image/caption alignment of a tiny Llava folder: the hand computation, the training
metric, and the CLI's files and MLflow reports (into a new run and into the recorded training run)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.analysis.alignment import aligned_samples, main, measure, sample_encoder, shard_paths
from pipeline.analysis.model_folder import TRAINING_FILE, load_model_folder
from pipeline.analysis.report import MlflowTarget, log_report
from pipeline.data.batch import collate
from pipeline.data.shards import ShardWriter, shard_name
from pipeline.export import build_processor
from pipeline.model.assemble import ModelConfig, build_llava
from pipeline.tga.loss import TGAConfig
from pipeline.train.config import PromptConfig, TrainConfig
from pipeline.train.step import CaptionTargets, tga_forward
from tests.conftest import write_training_shards


def save_tiny_llava(world, folder: Path, *, template: str = "llama2") -> Path:
    """The tiny world's CLIP + LLM as a Llava folder laid out like `pipeline.export --format hf`."""
    cfg = TrainConfig(stage="stage1", run_dir=folder.parent / "run", shards=folder.parent,
                      model=ModelConfig(llm=world.llm, vision_tower=world.clip, attn_implementation="sdpa",
                                        dtype="fp32"),
                      prompt=PromptConfig(template=template))
    assembled = build_llava(cfg.model)
    torch.manual_seed(0)  # the projector is untrained: any fixed weights will do
    assembled.model.model.multi_modal_projector.apply(
        lambda m: m.reset_parameters() if isinstance(m, torch.nn.Linear) else None)
    assembled.model.save_pretrained(folder)
    build_processor(assembled, cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava_dir(tiny_world, tmp_path_factory):
    return save_tiny_llava(tiny_world, tmp_path_factory.mktemp("llava") / "llava")


@pytest.fixture(scope="module")
def shards(tiny_world, tmp_path_factory):
    return write_training_shards(tiny_world, tmp_path_factory.mktemp("align_shards"), samples=6, per_shard=3)


@pytest.fixture(scope="module")
def loaded(llava_dir):
    return load_model_folder(llava_dir, require_llava=True)


@pytest.fixture(scope="module")
def samples(loaded, shards):
    kept, skipped = aligned_samples(shard_paths(shards), sample_encoder(loaded), limit=5)
    assert len(kept) == 5 and not skipped
    return kept


def _pooled_by_hand(hidden_states, start: int, end: int) -> list[torch.Tensor]:
    return [h[0, start:end].float().mean(dim=0) for h in hidden_states]


def test_batched_cosines_equal_a_per_sample_hand_computation(loaded, samples):
    cosines = measure(loaded, samples, batch_size=3)  # padded batches of 3 and 2
    assert cosines.shape == (loaded.num_layers + 1, len(samples))
    llava = loaded.model.model
    with torch.no_grad():
        for b, sample in enumerate(samples):
            text = sample.text
            image = llava(input_ids=torch.tensor([text.input_ids]), pixel_values=sample.pixel_values[None],
                          output_hidden_states=True).hidden_states
            caption = llava(input_ids=torch.tensor([text.caption_input_ids]),
                            output_hidden_states=True).hidden_states
            image_pooled = _pooled_by_hand(image, *text.image_span)
            caption_pooled = _pooled_by_hand(caption, *text.caption_span)
            for layer in range(loaded.num_layers + 1):
                expected = F.cosine_similarity(image_pooled[layer], caption_pooled[layer], dim=0)
                assert cosines[layer, b].item() == pytest.approx(expected.item(), abs=1e-4), (b, layer)


def test_cosines_are_the_metric_the_training_step_logs(loaded, samples):
    layers = [1, 3, 6]
    batch = collate(samples, loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        _, parts = tga_forward(loaded.model, batch, CaptionTargets(layers, cached=False), 0.0,
                               TGAConfig(layers=layers))
    cosines = measure(loaded, samples, batch_size=len(samples))
    for layer in layers:
        assert cosines[layer].mean().item() == pytest.approx(float(parts[f"cos_layer/{layer}"]), abs=1e-5)


def test_cli_writes_json_and_plot_and_logs_a_new_run(llava_dir, shards, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    main(["--model", str(llava_dir), "--shards", str(shards), "--out", str(out), "--samples", "4",
          "--batch-size", "2", "--mlflow-uri", uri])
    report = json.loads((out / "alignment.json").read_text())
    assert report["samples"] == 4 and sorted(report["layers"], key=int) == [str(l) for l in range(7)]
    assert report["prompt"] == {"template": "tokenizer", "insert_retrieved": False, "max_tokens": 2048}
    assert all(-1 <= v["mean"] <= 1 and v["std"] >= 0 for v in report["layers"].values())
    assert (out / "alignment.png").read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tga-eval").experiment_id])
    assert run.info.run_name == "alignment" and run.data.tags["tga.model"] == "llava"
    assert run.data.metrics["cos_layer/3"] == pytest.approx(report["layers"]["3"]["mean"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"alignment.json", "alignment.png"}


def test_cli_reports_into_the_training_run_with_the_training_prompt(llava_dir, shards, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("tga-tiny", artifact_location=(tmp_path / "artifacts").as_uri())
    training_run = client.create_run(experiment).info.run_id
    exported = shutil.copytree(llava_dir, tmp_path / "export")
    prompt = {"template": "llama2", "insert_retrieved": True, "max_tokens": 512}
    (exported / TRAINING_FILE).write_text(json.dumps({
        "stage": "stage1", "run_dir": str(tmp_path), "tracking_uri": uri, "run_id": training_run,
        "prompt": prompt, "tga_layers": [2, 3, 4]}))
    main(["--model", str(exported), "--shards", str(shards), "--out", str(tmp_path / "out"), "--samples", "2"])
    report = json.loads((tmp_path / "out" / "alignment.json").read_text())
    assert report["prompt"] == prompt

    run = client.get_run(training_run)
    assert run.data.metrics["alignment/cos_layer/2"] == pytest.approx(report["layers"]["2"]["mean"])
    assert run.data.tags["alignment.prompt.insert_retrieved"] == "True"
    assert {a.path for a in client.list_artifacts(training_run, "eval/alignment")} == {
        "eval/alignment/alignment.json", "eval/alignment/alignment.png", "eval/alignment/params.json"}
    assert len(client.search_runs([run.info.experiment_id])) == 1  # no second run


def test_an_unreachable_store_is_a_warning_not_a_crash(tmp_path, caplog):
    report = tmp_path / "r.json"
    report.write_text("{}")
    target = MlflowTarget("http://127.0.0.1:9", None, "tga-eval", "llava")
    assert log_report(target, name="alignment", files=[report], metrics={"x": 1.0}, params={}) is None
    assert "not logged" in caplog.text


def test_shards_without_aligned_samples_are_refused(llava_dir, tiny_world, tmp_path):
    record = json.loads(tiny_world.stage1_json.read_text())[0]
    with ShardWriter(tmp_path / "shards" / shard_name(0)) as writer:
        writer.write("text_only", None, {"key": "text_only", "conversations": [
            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}], "image_caption": ""})
        # toxic samples get no caption target (as in training)
        writer.write("toxic", (tiny_world.images / record["image"]).read_bytes(), {
            "key": "toxic", "conversations": record["conversations"], "image_caption": "a caption",
            "toxic": True, "retrieved": []})
    with pytest.raises(SystemExit, match=r"alignment error: .*'no_image': 1, 'no_caption': 1"):
        main(["--model", str(llava_dir), "--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "o"),
              "--no-mlflow"])
    with pytest.raises(SystemExit, match="no shards"):
        main(["--model", str(llava_dir), "--shards", str(tmp_path), "--out", str(tmp_path / "o"), "--no-mlflow"])
