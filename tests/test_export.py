"""Export of a real stage-1 ZeRO-3 checkpoint: the projector file and a transformers Llava folder
that plain transformers loads, preprocesses like training and generates with (in the training dtype by default,
with the trained weights from the checkpoint, the frozen ones from the base folders, and a model card)."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, CLIPImageProcessor,
                          CLIPVisionModel, LlavaForConditionalGeneration, LlavaProcessor)

from pipeline.data.batch import SampleEncoder
from pipeline.eval import ability
from pipeline.export import (ExportError, export_chat_template, load_full_state, main, resolve_step,
                             run_config)
from pipeline.model.assemble import load_projector, load_tokenizer
from pipeline.model_card import ModelCardError, hub_id, write_card
from pipeline.model_card import main as card_main
from pipeline.tga.prompt import build_sample
from pipeline.tga.templates import TEMPLATES, get_template, template_source
from pipeline.train.checkpoint import COMPLETE, export_full_state_dict, trained_weights
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
    main(["--checkpoint", str(run_dir / "checkpoints"), "--out", str(out), "--format", "hf", "--dtype", "bf16"])
    return out


@pytest.fixture(scope="module")
def fp32_dir(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_fp32") / "llava"
    main(["--checkpoint", str(run_dir / "checkpoints"), "--out", str(out)])  # a CPU run: fp32 by default
    return out


@pytest.fixture(scope="module")
def exported(hf_dir):
    return AutoModelForImageTextToText.from_pretrained(hf_dir), AutoProcessor.from_pretrained(hf_dir)


def eval_batch(world, processor, count: int) -> dict:
    """The tiny world's first eval questions with their images, as plain transformers users send
    them, in one left-padded batch (one generate call for all)."""
    records = json.loads(world.benign_vqa_json.read_text())[:count]
    texts = [processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": r["conversations"][0]["value"].replace("<image>", "").strip()}]}],
        add_generation_prompt=True) for r in records]
    images = [Image.open(world.images / r["image"]).convert("RGB") for r in records]
    processor.tokenizer.padding_side = "left"
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


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


def test_stage1_checkpoint_holds_the_projector_its_optimizer_state_and_the_loader_position_only(
        run_dir, fp32_dir):
    step_dir = run_dir / "checkpoints" / f"global_step{STEPS}"
    projector = sum(t.numel() for t in load_file(run_dir / "export" / "projector.safetensors").values())
    frozen = sum(p.numel() for p in LlavaForConditionalGeneration.from_pretrained(fp32_dir).parameters()) - projector
    assert frozen > 50 * projector
    # fp32 master weights + Adam's two moments, 4 bytes each; the rest is DeepSpeed's metadata
    # (names, shapes, scheduler), our train state, the loader position and RNG states
    size = sum(f.stat().st_size for f in step_dir.iterdir())
    assert 12 * projector <= size <= 12 * projector + 64 * 1024, (size, projector, frozen)
    assert sorted(export_full_state_dict(run_dir / "checkpoints", STEPS)) == sorted(
        f"model.multi_modal_projector.{name}" for name in ("linear_1.weight", "linear_1.bias",
                                                           "linear_2.weight", "linear_2.bias"))


def test_hf_export_holds_the_trained_weights_of_the_checkpoint_and_the_frozen_ones_of_the_base_folders(
        run_dir, fp32_dir, tiny_world):
    model = LlavaForConditionalGeneration.from_pretrained(fp32_dir)
    weights = model.state_dict()
    for name, lazy in trained_weights(run_dir / "checkpoints", STEPS).items():
        assert torch.equal(weights[name], lazy.contiguous()), name
    loops = load_file(run_dir / "export" / "projector.safetensors")
    for name, tensor in loops.items():
        assert torch.equal(weights["model." + name], tensor), name
    llm = AutoModelForCausalLM.from_pretrained(tiny_world.llm)
    tower = CLIPVisionModel.from_pretrained(tiny_world.clip)
    for part, base in ((model.model.language_model, llm.model), (model.lm_head, llm.lm_head),
                       (model.model.vision_tower, tower)):
        theirs = base.state_dict()
        for name, tensor in part.state_dict().items():
            assert torch.equal(tensor, theirs[name]), name


def test_the_default_dtype_is_the_runs_and_bf16_equals_the_fp32_export_cast(run_dir, hf_dir, fp32_dir, exported):
    from pipeline.export import training_dtype

    ds = json.loads((run_dir / "deepspeed.json").read_text())
    assert ds["bf16"]["enabled"] is False and training_dtype(run_dir / "checkpoints") == "fp32"
    gpu_run = dict(ds, bf16={"enabled": True})
    (run_dir / "deepspeed.json").write_text(json.dumps(gpu_run))
    try:
        assert training_dtype(run_dir / "checkpoints") == "bf16"
    finally:
        (run_dir / "deepspeed.json").write_text(json.dumps(ds))
    model, processor = exported
    assert type(model) is LlavaForConditionalGeneration and type(processor) is LlavaProcessor
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["dtype"] == config["text_config"]["dtype"] == config["vision_config"]["dtype"] == "bfloat16"
    full = load_file(fp32_dir / "model.safetensors")
    half = load_file(hf_dir / "model.safetensors")
    assert sorted(half) == sorted(full)
    for name, tensor in full.items():
        assert tensor.dtype == torch.float32 and torch.equal(half[name], tensor.to(torch.bfloat16)), name
    assert (hf_dir / "model.safetensors").stat().st_size < 0.6 * (fp32_dir / "model.safetensors").stat().st_size


def test_bf16_export_generates_the_fp32_exports_greedy_tokens_but_at_near_ties(exported, fp32_dir, tiny_world):
    """bf16 keeps 8 significant bits: the logits move by a little, so greedy decoding can only take
    another token where the fp32 model's best two were within that little of each other (the
    tiny world's barely trained LLM has such near-ties). Up to that step both are identical."""
    bf16, _ = exported
    fp32 = LlavaForConditionalGeneration.from_pretrained(fp32_dir)
    inputs = eval_batch(tiny_world, AutoProcessor.from_pretrained(fp32_dir), count=8)
    prompt = inputs["input_ids"].shape[1]
    (full, full_scores), (half, half_scores) = [
        (run.sequences[:, prompt:], torch.stack(run.scores, dim=1).float())  # scores: (prompts, steps, vocab)
        for run in (model.generate(**{**inputs, "pixel_values": inputs["pixel_values"].to(model.dtype)},
                                   max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                                   output_scores=True) for model in (fp32, bf16))]
    identical = 0
    for row in range(len(full)):
        steps = min(full.shape[1], half.shape[1])
        differs = (full[row, :steps] != half[row, :steps]).nonzero()
        same_until = differs[0, 0].item() + 1 if len(differs) else steps  # including the step that differs
        # the same inputs up to there: the logits agree within the tolerance, so a different token
        # means fp32's best two were within twice the tolerance
        gap = (full_scores[row, :same_until] - half_scores[row, :same_until]).abs().max()
        assert gap <= 0.5, (row, gap)
        identical += not len(differs)
    assert identical >= 6, identical


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_hf_export_has_a_model_card_naming_base_models_data_tga_settings_steps_and_mlflow_run(
        run_dir, hf_dir, tiny_world):
    card = (hf_dir / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    assert {"llava", "tga"} <= set(meta["tags"]) and "base_model" not in meta  # local folders: no hub ids
    cfg = run_config(run_dir / "checkpoints")
    tracking = json.loads((run_dir / "mlflow_run.json").read_text())
    for expected in (f"| language model | `{tiny_world.llm.name}` (a local folder) |",
                     f"| vision tower | `{tiny_world.clip.name}` (a local folder) |", "| weights | bf16 |",
                     f"{STEPS} optimizer steps on 1 rank, {STEPS * 4} samples drawn",
                     f"| shards | 1.000 | {STEPS} | {STEPS * 4} |",  # the run's shards: 4 samples each
                     f"layers {list(cfg.tga.layers)}, align_weight {cfg.tga.align_weight}, pair_weight "
                     f"{cfg.tga.pair_weight}", f"experiment `{cfg.tracking.experiment}`, run `{tracking['run_id']}`",
                     "Not evaluated yet"):
        assert expected in card, expected


def test_exported_files_are_readable_by_others_as_the_umask_allows(hf_dir):
    """Not the 0600 of the writers' private temporary files: a shared model folder is read by others."""
    umask = os.umask(0)
    os.umask(umask)
    modes = {path.name: path.stat().st_mode & 0o777 for path in hf_dir.iterdir() if path.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


def test_model_card_refresh_adds_the_results_of_this_folders_evaluation_and_refuses_another_models(
        hf_dir, tiny_world, tmp_path):
    folder = shutil.copytree(hf_dir, tmp_path / "llava")
    summary = ability.main(["--model", str(folder), "--data", str(tiny_world.benign_vqa_json),
                            "--out", str(folder / "eval" / "ability"), "--limit", "2", "--max-new-tokens", "4",
                            "--no-insert-retrieved", "--no-mlflow"])
    card_main([str(folder)])
    card = (folder / "README.md").read_text()
    assert f"| ability token F1 | {summary['token_f1']:.3f} |" in card and "Not evaluated yet" not in card
    assert "From: `ability/summary.json`." in card
    # the same report moved next to another model: not this folder's result
    with pytest.raises(ModelCardError, match=r"ability/summary.json: reports on .*llava, not on .*other"):
        write_card(shutil.copytree(folder, tmp_path / "other"))


def test_model_card_names_hub_models_as_base_model_and_refuses_a_folder_not_exported(hf_dir, tmp_path):
    assert hub_id("hub/models--lmsys--vicuna-7b-v1.5/snapshots/0123abc") == "lmsys/vicuna-7b-v1.5"
    assert hub_id("work/tiny/models/llm") is None
    info = json.loads((hf_dir / "tga_training.json").read_text())
    info["base_models"] = {"llm": "hub/models--lmsys--vicuna-7b-v1.5/snapshots/0123abc",
                           "vision_tower": "hub/models--openai--clip-vit-large-patch14-336/snapshots/4567def"}
    (tmp_path / "tga_training.json").write_text(json.dumps(info))
    card = write_card(tmp_path, title="llava-tga-7b").read_text()
    assert front_matter(card)["base_model"] == ["lmsys/vicuna-7b-v1.5", "openai/clip-vit-large-patch14-336"]
    assert "# llava-tga-7b" in card and "[lmsys/vicuna-7b-v1.5](https://huggingface.co/lmsys/vicuna-7b-v1.5)" in card
    with pytest.raises(SystemExit, match=r"model card error: .*empty/tga_training.json: missing"):
        card_main([str(tmp_path / "empty")])


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
