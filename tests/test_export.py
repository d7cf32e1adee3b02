"""Export of a real stage-1 ZeRO-3 checkpoint: the projector file and a transformers Llava folder
that plain transformers loads, preprocesses like training and generates with."""
from __future__ import annotations

import dataclasses
import io
import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (AutoModelForImageTextToText, AutoProcessor, CLIPImageProcessor,
                          LlavaForConditionalGeneration, LlavaProcessor)

from pipeline.data.batch import SampleEncoder
from pipeline.export import (ExportError, export_chat_template, load_full_state, main, resolve_step,
                             run_config)
from pipeline.model.assemble import load_projector, load_tokenizer
from pipeline.tga.prompt import build_sample
from pipeline.tga.templates import TEMPLATES, get_template, template_source
from pipeline.train.checkpoint import COMPLETE, export_full_state_dict
from tests.conftest import write_training_shards
from tests.stage_runner import run_stage, stage_overrides

pytestmark = pytest.mark.slow
STEPS = 3  # checkpoints at steps 2 (periodic) and 3 (final)
QUESTION = "What shapes are in the picture?"


@pytest.fixture(scope="module")
def run_dir(tiny_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export_run")
    shards = write_training_shards(tiny_world, tmp / "shards", samples=4 * STEPS, per_shard=4)
    run = tmp / "run"
    run_stage("stages.stage1_align", "configs/tiny/stage1.yaml",
              stage_overrides(tiny_world, shards, run, **{
                  "max_steps": STEPS, "checkpoint.every_steps": 2, "tracking.plot_every_steps": 0}),
              ranks=1, log=tmp / "stage1.log")
    return run


@pytest.fixture(scope="module")
def hf_dir(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_hf") / "llava"
    main(["--checkpoint", str(run_dir / "checkpoints"), "--out", str(out), "--format", "hf"])
    return out


@pytest.fixture(scope="module")
def exported(hf_dir):
    return AutoModelForImageTextToText.from_pretrained(hf_dir), AutoProcessor.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def scene(tiny_world):
    record = json.loads(tiny_world.stage1_json.read_text())[0]
    return Image.open(tiny_world.images / record["image"]).convert("RGB")


@pytest.fixture(scope="module")
def training_tokenizer(run_dir):
    """The tokenizer (and its chat template) exactly as the training loop built it."""
    cfg = run_config(run_dir / "checkpoints")
    return load_tokenizer(cfg.model), cfg


def test_projector_export_equals_the_stage1_loops_own_export(run_dir, hf_dir, tmp_path):
    main(["--checkpoint", str(run_dir / "checkpoints"), "--out", str(tmp_path / "p"), "--format", "projector"])
    ours = load_file(tmp_path / "p" / "projector.safetensors")
    loops = load_file(run_dir / "export" / "projector.safetensors")
    assert sorted(ours) == sorted(loops)
    for name, weight in loops.items():
        assert torch.equal(ours[name], weight), name
    # The format stage 2 reads (model.projector): it loads into a Llava model of this run.
    load_projector(LlavaForConditionalGeneration.from_pretrained(hf_dir), tmp_path / "p" / "projector.safetensors")


def test_hf_export_loads_with_plain_transformers_and_holds_the_checkpoint_weights(run_dir, exported):
    model, processor = exported
    assert type(model) is LlavaForConditionalGeneration and type(processor) is LlavaProcessor
    consolidated = export_full_state_dict(run_dir / "checkpoints", STEPS)
    weights = model.state_dict()
    assert sorted(weights) == sorted(consolidated)
    for name, tensor in consolidated.items():
        assert torch.equal(weights[name], tensor), name
    loops = load_file(run_dir / "export" / "projector.safetensors")
    for name, tensor in loops.items():
        assert torch.equal(weights["model." + name], tensor), name


def test_hf_export_records_the_prompt_layers_and_mlflow_run_of_the_training(run_dir, hf_dir):
    info = json.loads((hf_dir / "tga_training.json").read_text())
    cfg = run_config(run_dir / "checkpoints")
    tracking = json.loads((run_dir / "mlflow_run.json").read_text())
    assert info["stage"] == "stage1" and info["step"] == STEPS
    assert info["prompt"] == dataclasses.asdict(cfg.prompt) and info["tga_layers"] == list(cfg.tga.layers)
    assert (info["tracking_uri"], info["run_id"]) == (tracking["tracking_uri"], tracking["run_id"])
    from mlflow import MlflowClient

    assert MlflowClient(info["tracking_uri"]).get_run(info["run_id"]).data.tags["stage"] == "stage1"


def test_hf_processor_tokenizes_like_training_and_generate_adds_tokens(exported, scene, training_tokenizer):
    model, processor = exported
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"<image>\n{QUESTION}"}], tokenize=False, add_generation_prompt=True)
    inputs = processor(images=scene, text=prompt, add_special_tokens=False, return_tensors="pt")
    image_tokens = int((inputs["input_ids"] == model.config.image_token_index).sum())
    assert image_tokens == model.config.image_seq_length == 16

    # The same question as a training sample: its ids start with exactly the inference prompt.
    tokenizer, cfg = training_tokenizer
    trained = build_sample(tokenizer, [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                       {"from": "gpt", "value": "A circle."}],
                           template=cfg.prompt.template, image_caption=None, retrieved_text=None,
                           insert_retrieved=False, num_image_tokens=model.config.image_seq_length,
                           max_tokens=cfg.prompt.max_tokens)
    prompt_ids = inputs["input_ids"][0].tolist()
    assert trained.input_ids[:len(prompt_ids)] == prompt_ids

    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > len(prompt_ids)
    assert generated[0, :len(prompt_ids)].tolist() == prompt_ids
    again = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, again)  # greedy


def test_hf_chat_template_is_the_training_template_for_strings_and_multimodal_messages(
        exported, scene, training_tokenizer):
    _, processor = exported
    tokenizer = processor.tokenizer
    trained_with, cfg = training_tokenizer
    training = template_source(get_template(cfg.prompt.template), trained_with)
    assert tokenizer.chat_template != training  # the export adds the multimodal-message prefix
    turns = [{"role": "user", "content": f"<image>\n{QUESTION}"}, {"role": "assistant", "content": "Two."},
             {"role": "user", "content": "And the colour?"}]
    assert tokenizer.apply_chat_template(turns, tokenize=False) == \
        tokenizer.apply_chat_template(turns, chat_template=training, tokenize=False)
    multimodal = [{"role": "user", "content": [{"type": "image", "image": scene},
                                               {"type": "text", "text": QUESTION}]}]
    rendered = processor.apply_chat_template(multimodal, add_generation_prompt=True)
    assert rendered == tokenizer.apply_chat_template(turns[:1], chat_template=training, tokenize=False,
                                                     add_generation_prompt=True)
    inputs = processor.apply_chat_template(multimodal, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == 1
    assert int((inputs["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum()) == 16


def test_hf_processor_pads_and_resizes_images_like_training(exported, scene, tiny_world):
    _, processor = exported
    wide = scene.crop((0, 8, 64, 40))  # 64×32: padding to square matters
    png = io.BytesIO()
    wide.save(png, format="PNG")
    encoder = SampleEncoder(processor.tokenizer, CLIPImageProcessor.from_pretrained(tiny_world.clip),
                            num_image_tokens=16, template="tokenizer", insert_retrieved=False,
                            max_tokens=256, pad_to_square=True)
    training = encoder.pixels(png.getvalue())
    exported_pixels = processor.image_processor(images=wide, return_tensors="pt")["pixel_values"][0]
    assert exported_pixels.shape == training.shape
    assert torch.allclose(exported_pixels, training, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in TEMPLATES if n != "tokenizer"])
def test_every_builtin_template_renders_multimodal_messages_as_the_training_strings(name, training_tokenizer):
    tokenizer, cfg = training_tokenizer
    cfg = dataclasses.replace(cfg, prompt=dataclasses.replace(cfg.prompt, template=name))
    exported = export_chat_template(cfg, tokenizer)
    training = template_source(get_template(name), tokenizer)
    strings = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"<image>\n{QUESTION}"},
               {"role": "assistant", "content": "Two."}, {"role": "user", "content": "Which colour?"}]
    lists = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Two."}]},
             {"role": "user", "content": "Which colour?"}]
    if name == "plain":  # LLaVA's stage-1 format has no system prompt
        strings, lists = strings[1:], lists[1:]
    for turns in (strings[:2], strings):
        expected = tokenizer.apply_chat_template(turns, chat_template=training, tokenize=False,
                                                 add_generation_prompt=True)
        assert tokenizer.apply_chat_template(turns, chat_template=exported, tokenize=False,
                                             add_generation_prompt=True) == expected
        assert tokenizer.apply_chat_template(lists[:len(turns)], chat_template=exported, tokenize=False,
                                             add_generation_prompt=True) == expected


def test_incomplete_checkpoint_is_refused_with_the_checkpoint_modules_message(run_dir, tmp_path):
    ckpt = shutil.copytree(run_dir / "checkpoints", tmp_path / "checkpoints")
    (ckpt / f"global_step{STEPS}" / COMPLETE).unlink()
    with pytest.raises(SystemExit, match=r"no COMPLETE marker.*complete steps in .*: \[2\]"):
        main(["--checkpoint", str(ckpt), "--step", str(STEPS), "--out", str(tmp_path / "p"),
              "--format", "projector"])
    assert not (tmp_path / "p").exists()
    assert resolve_step(ckpt, None) == 2  # `latest` names the incomplete one: the previous is used


def test_unknown_step_is_refused_listing_the_complete_steps(run_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"no checkpoint for step 7; complete steps: \[2, 3\]"):
        main(["--checkpoint", str(run_dir / "checkpoints"), "--step", "7", "--out", str(tmp_path / "hf")])
    with pytest.raises(SystemExit, match=r"did you mean .*checkpoints"):
        main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()


def test_existing_output_folder_is_refused(run_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(SystemExit, match="exists and is not an empty folder"):
        main(["--checkpoint", str(run_dir / "checkpoints"), "--out", str(tmp_path / "out"),
              "--format", "projector"])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_weights_that_do_not_match_the_model_are_refused_naming_the_keys(exported, tmp_path):
    model, _ = exported
    state = dict(model.state_dict())
    state["lm_head.weights"] = state.pop("lm_head.weight")
    with pytest.raises(ExportError, match=r"missing from the checkpoint \(1\): lm_head\.weight\n"
                                          r".*not in the model \(1\): lm_head\.weights"):
        load_full_state(model, state, tmp_path)
    state = dict(model.state_dict())
    name = "model.multi_modal_projector.linear_1.weight"
    state[name] = torch.zeros(3, 3)
    with pytest.raises(ExportError, match=rf"{name}: checkpoint \(3, 3\), model"):
        load_full_state(model, state, tmp_path)
