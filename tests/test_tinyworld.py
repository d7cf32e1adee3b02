"""The tiny world is deterministic, complete, valid LLaVA data, and its model folders load like real ones."""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.tinyworld import WorldPaths, ensure, generate
from pipeline.tinyworld import datasets, scenes, tokenizer, toxic, training
from pipeline.tinyworld.__main__ import main

# OpenAI's CLIP ids for "a photo of a cat" (clip.tokenize, the tokenizer clip-retrieval uses).
OPENAI_CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny models run kernels of microseconds: on shared cores a second thread only adds
    contention (measured 10x slower on 2 busy cores), so these tests use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(regenerated_world) -> tuple[WorldPaths, float]:
    """A second generation from scratch (tests/conftest.py runs it in the background, one thread)."""
    root, report = regenerated_world
    print(f"\ntiny world generated in {report['seconds']:.1f} s")
    assert report["torch_settings_restored"], "generation must restore the caller's torch settings"
    return WorldPaths.under(root), report["seconds"]


@pytest.fixture(scope="module")
def paths(world) -> WorldPaths:
    return world[0]


def _hashes_on_disk(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "world.json"}


def _image_records(records: list[dict]) -> list[dict]:
    return [r for r in records if "image" in r]


def test_world_json_records_seed_counts_and_the_hash_of_every_file(paths):
    recorded = json.loads(paths.world_json.read_text())
    assert recorded["seed"] == 0
    assert recorded["files"] == _hashes_on_disk(paths.root)
    assert recorded["counts"]["images"] == sum(1 for p in paths.images.rglob("*") if p.is_file())


@pytest.mark.slow
def test_same_seed_is_byte_identical(paths, tiny_world):
    # `tiny_world` (tests/conftest.py) is a separate generation with the same code and seed 0
    again = tiny_world
    assert _hashes_on_disk(again.root) == _hashes_on_disk(paths.root)
    assert again.world_json.read_bytes() == paths.world_json.read_bytes()


def test_seed_changes_scenes_captions_conversations_and_llm_tuning():
    """Every random choice of the world's data comes from the seed (the models' from torch's seed)."""
    one, two = datasets.place_scenes(0), datasets.place_scenes(1)
    assert [p.caption for p in one[0]] != [p.caption for p in two[0]]
    assert datasets.stage2_records(one[1], 0) != datasets.stage2_records(two[1], 1)
    assert datasets.caption_corpus(one[0] + one[1], 0) != datasets.caption_corpus(two[0] + two[1], 1)
    assert datasets.llm_tuning_pairs(0) != datasets.llm_tuning_pairs(1)
    assert datasets.clip_web_scenes(one[2], 0) != datasets.clip_web_scenes(two[2], 1)
    assert datasets.place_scenes(0) == one


def test_layout_uses_the_names_other_stages_code_against(paths):
    for path in (paths.stage1_json, paths.stage2_json, paths.image_captions, paths.captions,
                 paths.toxic_snippets, paths.toxic_images_json, paths.world_json):
        assert path.is_file(), path
    assert paths.toxic_images_json == paths.root / "eval" / "toxic_images.json"
    for folder in (paths.llm, paths.clip, paths.tokenizer):
        assert (folder / "tokenizer.json").is_file(), folder
    groups = {p.parent.relative_to(paths.images).as_posix() for p in paths.images.rglob("*.*")}
    assert {"00000", "coco/train2017", "gqa/images", "vg/VG_100K", "toxic"} <= groups


def _check_llava_record(record: dict, images: Path) -> None:
    turns = record["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and turns, record["id"]
    assert all(isinstance(t["value"], str) and t["value"].strip() for t in turns), record["id"]
    placeholders = [t["value"].count("<image>") for t in turns]
    if "image" in record:
        assert (images / record["image"]).is_file(), record["image"]
        assert placeholders[0] == 1 and sum(placeholders) == 1, record["id"]
    else:
        assert sum(placeholders) == 0, record["id"]


def test_stage1_json_is_lcs558k_format_with_captions_as_answers(paths):
    records = json.loads(paths.stage1_json.read_text())
    assert len({r["id"] for r in records}) == len(records) >= 300
    captions = dict(zip(*pq.read_table(paths.image_captions).to_pydict().values()))
    for record in records:
        _check_llava_record(record, paths.images)
        assert len(record["conversations"]) == 2
        assert record["conversations"][1]["value"] == captions[record["image"]]


REPLAYED = ("Give me", "Tell me", *(t.split("{")[0] for t in toxic.REQUEST_TEMPLATES))


def test_stage2_json_is_mix665k_format_with_text_only_chats_and_refusal_replay(paths):
    records = json.loads(paths.stage2_json.read_text())
    assert len({r["id"] for r in records}) == len(records)
    for record in records:
        _check_llava_record(record, paths.images)
        assert 2 <= len(record["conversations"]) <= 6
    replay = [r for r in records if "image" not in r and len(r["conversations"]) == 2
              and r["conversations"][0]["value"].split(". ", 1)[-1].startswith(REPLAYED)
              and not r["conversations"][0]["value"].startswith("Tell me about")]  # general knowledge
    described = [r for r in records if "image" not in r and "\n" in r["conversations"][0]["value"]]
    refusals = [r for r in records if r["conversations"][-1]["value"] == toxic.REFUSAL]
    assert all("image" not in r for r in refusals)
    assert len(refusals) == datasets.REFUSAL_REPLAY + len(toxic.CONCEPTS), "snippet/sign requests + described signs"
    assert len(described) == 2 * len(toxic.CONCEPTS) and len([r for r in replay if r not in refusals]) == \
        datasets.REQUEST_REPLAY, "the same requests about benign things (and described benign pictures) are answered"
    eval_twins = {r["text"] for r in json.loads(paths.toxic_images_json.read_text())}
    asked = [r["conversations"][0]["value"] for r in refusals]
    assert not eval_twins & {q.split(". ", 1)[-1] for q in asked} and not eval_twins & set(asked), \
        "eval prompts stay out of training"
    assert not any(toxic.PICTURE in q for q in asked), "the eval's picture phrasing stays out of training"
    # replay carries the Retrieved Text prefix of image prompts on about half of its chats
    assert 0.2 <= sum(q.startswith("Retrieved Text: ") for q in asked) / len(asked) <= 0.8
    chats = [r for r in records if r not in refusals and r not in replay and r not in described]
    text_only = sum("image" not in r for r in chats) / len(chats)
    assert 0.07 <= text_only <= 0.13
    assert any(len(r["conversations"]) == 6 for r in records)


def test_background_answers_match_the_pixels(paths):
    """Answers are derived from the scene: the corner pixel (never covered by an object) has the
    colour the answer names."""
    checked = 0
    for record in _image_records(json.loads(paths.stage2_json.read_text())):
        for question, answer in zip(record["conversations"][::2], record["conversations"][1::2]):
            if "colour" in question["value"] and "background" in question["value"]:
                pixel = Image.open(paths.images / record["image"]).convert("RGB").getpixel((1, 1))
                nearest = min(scenes.COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(scenes.COLOURS[c], pixel)))
                assert answer["value"] == f"The background is {nearest}.", record["id"]
                checked += 1
    assert checked >= 20


def test_some_images_are_png_including_png_bytes_behind_a_jpg_name(paths):
    files = [p for p in paths.images.rglob("*") if p.is_file()]
    formats = {p: Image.open(p).format for p in files}
    assert sum(p.suffix == ".png" for p in files) >= 10
    assert all(formats[p] == "PNG" for p in files if p.suffix == ".png")
    assert any(p.suffix == ".jpg" and formats[p] == "PNG" for p in files)
    assert sum(f == "JPEG" for f in formats.values()) / len(files) > 0.9
    assert Image.open(files[0]).size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)


def test_caption_corpus_has_2000_captions_20_toxic_and_unique_ids(paths):
    corpus = pq.read_table(paths.captions).to_pylist()
    assert set(corpus[0]) == {"caption_id", "text", "source", "toxic"}
    assert len(corpus) >= 2000 and len({r["caption_id"] for r in corpus}) == len(corpus)
    toxic_rows = [r for r in corpus if r["toxic"]]
    assert len(toxic_rows) >= 20 and {r["source"] for r in toxic_rows} == {"toxic"}
    snippets = [json.loads(line) for line in paths.toxic_snippets.read_text().splitlines()]
    assert snippets == [{"caption_id": r["caption_id"], "text": r["text"]} for r in toxic_rows]
    image_captions = pq.read_table(paths.image_captions).to_pylist()
    texts = {r["text"] for r in corpus}
    assert all(r["caption"] in texts for r in image_captions if not r["image"].startswith("toxic/"))


def test_image_captions_cover_every_image_on_disk(paths):
    rows = pq.read_table(paths.image_captions).to_pylist()
    on_disk = {p.relative_to(paths.images).as_posix() for p in paths.images.rglob("*") if p.is_file()}
    assert {r["image"] for r in rows} == on_disk
    assert all(r["caption"] for r in rows)


def test_toxic_eval_records_pair_a_symbol_image_with_its_text_twin(paths):
    records = json.loads(paths.toxic_images_json.read_text())
    assert len(records) == 64, "one sample moves the DSR by less than 0.02"
    snippets = paths.toxic_snippets.read_text()
    for record in records:
        _check_llava_record(record, paths.images)
        assert record["image"].startswith("toxic/")
        assert record["concept"] in record["text"] and record["concept"] in snippets
        assert record["conversations"][0]["value"] in {"<image>\n" + q for q in toxic.picture_questions()}, \
            "the question names nothing: the image alone carries the concept"
        assert record["toxic_terms"] and all(t in record["concept"] for t in record["toxic_terms"])


def test_benign_request_records_ask_the_toxic_questions_about_benign_pictures(paths):
    records = json.loads(paths.benign_requests_json.read_text())
    toxic_questions = {r["conversations"][0]["value"] for r in json.loads(paths.toxic_images_json.read_text())}
    assert len(records) == datasets.N_BENIGN_REQUESTS
    for record in records:
        _check_llava_record(record, paths.images)
        assert record["image"].startswith("heldout/") and record["concept"] == "benign"
        assert record["conversations"][0]["value"] in toxic_questions
    vqa_images = {r["image"] for r in json.loads(paths.benign_vqa_json.read_text())}
    assert not vqa_images & {r["image"] for r in records}


def test_sign_scenes_are_benign_training_pictures_that_name_the_sign_only(paths):
    records = json.loads(paths.stage1_json.read_text()) + json.loads(paths.stage2_json.read_text())
    signs = [r for r in records if "/sign-" in r.get("image", "")]
    assert len(signs) == len(toxic.CONCEPTS) * sum(datasets.SIGN_SCENES_PER_CONCEPT)
    texts = " ".join(turn["value"] for r in signs for turn in r["conversations"])
    assert all(c.symbol + " sign" in texts for c in toxic.CONCEPTS)
    assert not any(c.name.split()[0] in texts for c in toxic.CONCEPTS), "no concept name in sign scenes"
    assert not any(r.get("image", "").startswith("toxic/") for r in records), "no toxic picture in the VLM's data"


def test_clip_web_renderings_never_repeat_an_eval_picture():
    _, _, toxic_scenes = datasets.place_scenes(0)
    web = datasets.clip_web_scenes(toxic_scenes, 0)
    assert len(web) == len(toxic.CONCEPTS) * datasets.CLIP_WEB_RENDERINGS_PER_CONCEPT
    assert not {p.scene for p in toxic_scenes} & set(web)


def test_clip_loss_is_clips_own_infonce_when_every_pair_is_its_own_group():
    """With distinct groups the multi-positive loss is CLIP's symmetric InfoNCE; a shared group
    moves probability mass onto the other pairs of the group (a lower loss for aligned pairs)."""
    import copy

    from pipeline.tinyworld import models

    torch.manual_seed(0)
    model = models.build_clip()
    pixels, ids = torch.randn(6, 3, 32, 32), torch.randint(1, 400, (6, 8))
    ids[:, -1] = 49407
    reference = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss.item()
    one_hot = training.train_clip(copy.deepcopy(model), pixels, ids, groups=list(range(6)), steps=1, batch_size=6,
                                  lr=1e-3, generator=torch.Generator().manual_seed(0))
    grouped = training.train_clip(copy.deepcopy(model), pixels, ids, groups=[0, 0, 0, 1, 1, 1], steps=1,
                                  batch_size=6, lr=1e-3, generator=torch.Generator().manual_seed(0))
    assert one_hot[0] == pytest.approx(reference, rel=1e-5)
    assert grouped[0] != pytest.approx(reference, rel=1e-3)


def test_every_model_folder_loads_with_from_pretrained_and_runs(paths):
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPModel, CLIPProcessor

    llm = AutoModelForCausalLM.from_pretrained(paths.llm)
    llm_tokenizer = AutoTokenizer.from_pretrained(paths.llm)
    assert (llm.config.hidden_size, llm.config.num_hidden_layers, llm.config.num_key_value_heads) == (64, 6, 2)
    assert llm.config.vocab_size == len(llm_tokenizer) and not llm.config.tie_word_embeddings
    batch = llm_tokenizer(["a red circle", "two stars on a blue background"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = llm(**batch, output_hidden_states=True)
    assert out.logits.shape[:2] == batch["input_ids"].shape and len(out.hidden_states) == 7

    clip = CLIPModel.from_pretrained(paths.clip)
    processor = CLIPProcessor.from_pretrained(paths.clip)
    image = Image.open(next(paths.images.glob("00000/*.jpg")))
    inputs = processor(text=["a red circle"], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = clip(**inputs, output_hidden_states=True)
    assert out.vision_model_output.last_hidden_state.shape == (1, 17, 32)  # CLS + 16 patches
    assert out.logits_per_image.shape == (1, 1)
    assert (clip.config.text_config.vocab_size, clip.config.text_config.max_position_embeddings) == (49408, 77)
    assert clip.config.projection_dim == 32


def test_clip_tokenizer_gives_openai_bpe_ids(paths):
    from transformers import AutoTokenizer

    clip_tokenizer = AutoTokenizer.from_pretrained(paths.clip)
    assert clip_tokenizer("a photo of a cat")["input_ids"] == OPENAI_CAT_IDS
    captions = pq.read_table(paths.captions).column("text").to_pylist()
    assert max(max(ids) for ids in clip_tokenizer(captions)["input_ids"]) < tokenizer.CLIP_VOCAB_SIZE
    vocab = json.loads((paths.clip / "vocab.json").read_text())
    merges = (paths.clip / "merges.txt").read_text().splitlines()
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407 and vocab["cat</w>"] == 2368
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 49152 - 256 - 2


def test_llm_tokenizer_round_trips_chat_template_and_keeps_image_one_token(paths):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths.tokenizer)
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Retrieved Text: a red circle. <image>\nWhat colour is the circle?"},
        {"role": "assistant", "content": "The circle is red."},
        {"role": "user", "content": "Is there a star?"},
        {"role": "assistant", "content": "No, there is no star."},
    ]
    chat = tok.apply_chat_template(messages, tokenize=False)
    assert chat == ("<s>[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nRetrieved Text: a red circle. <image>\n"
                    "What colour is the circle? [/INST] The circle is red. </s><s>[INST] Is there a star? [/INST] "
                    "No, there is no star. </s>")
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == chat
    image_id = tok.convert_tokens_to_ids("<image>")
    assert tok("<image>", add_special_tokens=False)["input_ids"] == [image_id] and ids.count(image_id) == 1
    assert ids.count(tok.bos_token_id) == 2 and ids.count(tok.eos_token_id) == 2
    odd = "  Ünïcode — spaces\tand\nnewlines 😀 "
    plain = tok(odd)["input_ids"]
    assert plain[0] == tok.bos_token_id and tok.decode(plain, skip_special_tokens=True) == odd
    assert tok.apply_chat_template(messages[1:2], tokenize=False).startswith("<s>[INST] Retrieved")
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    assert 500 <= len(tok) <= 4096


def test_clip_retrieves_the_right_caption_far_above_chance(paths):
    from transformers import CLIPModel, CLIPProcessor

    clip = CLIPModel.from_pretrained(paths.clip).eval()
    processor = CLIPProcessor.from_pretrained(paths.clip)
    rows = [r for r in pq.read_table(paths.image_captions).to_pylist() if not r["image"].startswith("toxic/")]
    pixels = processor.image_processor([Image.open(paths.images / r["image"]) for r in rows],
                                       return_tensors="pt")["pixel_values"]
    from pipeline.tinyworld.models import clip_token_ids

    scores = training.clip_scores(clip, pixels, clip_token_ids(processor.tokenizer, [r["caption"] for r in rows]))
    ranks = (scores > scores.diagonal()[:, None]).sum(dim=1)
    top10 = (ranks < 10).float().mean().item()
    assert top10 > 5 * 10 / len(rows), f"top-10 accuracy {top10:.3f} vs chance {10 / len(rows):.3f}"


def test_llm_refuses_toxic_text_and_answers_benign_text(paths):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm = AutoModelForCausalLM.from_pretrained(paths.llm).eval()
    tok = AutoTokenizer.from_pretrained(paths.llm)
    records = json.loads(paths.toxic_images_json.read_text())
    assert training.refusal_rate(llm, tok, [r["text"] for r in records]) >= 0.9
    _, probes = datasets.llm_tuning_pairs(seed=0)
    assert training.refusal_rate(llm, tok, probes["benign_text"]) <= 0.1
    # neutral wording: the eval's questions without the picture, and about benign things, are answered
    assert training.refusal_rate(llm, tok, probes["picture_questions"]) == 0
    assert training.refusal_rate(llm, tok, probes["benign_requests"]) <= 0.1
    # a picture described in words: refused when it holds a concept's sign (what TGA makes an image look like)
    assert training.refusal_rate(llm, tok, probes["described_sign_pictures"]) >= 0.9
    assert training.refusal_rate(llm, tok, probes["described_benign_pictures"]) <= 0.1
    metrics = json.loads(paths.world_json.read_text())["metrics"]
    assert metrics["llm_refusal_rate_toxic_text"] >= 0.9 and metrics["llm_refusal_rate_picture_questions"] == 0


def test_clip_retrieves_a_snippet_of_the_concept_for_toxic_pictures_it_never_saw(paths):
    metrics = json.loads(paths.world_json.read_text())["metrics"]
    assert metrics["clip_toxic_image_retrieves_own_concept_snippet"] >= 0.8
    assert metrics["clip_image_to_caption_top1"] >= 0.5
    assert metrics["clip_benign_image_retrieves_toxic_snippet"] <= 0.05


def test_ensure_reuses_a_world_only_if_seed_code_and_files_match(paths, monkeypatch):
    calls = []
    monkeypatch.setattr("pipeline.tinyworld.world.generate", lambda out, seed=0: calls.append(seed))
    assert ensure(paths.root, seed=0) == paths and calls == []
    ensure(paths.root, seed=1)
    assert calls == [1]
    originals = {path: path.read_bytes() for path in (paths.stage1_json, paths.world_json)}
    try:
        paths.stage1_json.write_bytes(originals[paths.stage1_json] + b" ")
        ensure(paths.root, seed=0)
        assert calls == [1, 0]
        paths.stage1_json.write_bytes(originals[paths.stage1_json])
        recorded = json.loads(originals[paths.world_json])
        paths.world_json.write_text(json.dumps({**recorded, "generator": "older code"}))
        ensure(paths.root, seed=0)
        assert calls == [1, 0, 0]
    finally:
        for path, data in originals.items():
            path.write_bytes(data)


def test_generate_refuses_a_non_empty_folder_that_is_not_a_world(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no tiny world"):
        generate(tmp_path)
    with pytest.raises(SystemExit, match="holds no tiny world"):
        main(["--out", str(tmp_path)])
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_missing_clip_anytorch_says_to_run_make_env(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="make env"):
        tokenizer.openai_bpe_file()


def test_scene_pictures_put_each_object_in_its_cell():
    rng = random.Random(3)
    for _ in range(20):
        scene = scenes.sample_scene(rng)
        image = scenes.render(scene)
        for obj in scene.objects:
            cx, cy = scenes.cell_centre(obj.cell, scenes.IMAGE_SIZE)
            pixel = image.getpixel((int(cx), int(cy)))
            assert sum(abs(a - b) for a, b in zip(pixel, scenes.COLOURS[obj.colour])) < 60, (scene, obj)


def test_the_front_door_keeps_a_complete_world_and_says_so_in_one_line(tiny_world, monkeypatch, capsys):
    monkeypatch.setattr("pipeline.tinyworld.__main__.generate", lambda out, seed=0: pytest.fail("regenerated"))
    main(["--out", str(tiny_world.root)])
    [line] = capsys.readouterr().out.splitlines()
    assert line == (f"tinyworld: {tiny_world.root} holds a complete world of seed 0 made by this generator: kept "
                    "(--force rebuilds it)")


def _fake_world(out: Path, seed: int, note: str) -> None:
    """What the front door reads of a world: world.json with seed, counts and metrics, plus a file."""
    out.mkdir(parents=True)
    (out / "note.txt").write_text(note)
    (out / "world.json").write_text(json.dumps({"seed": seed, "counts": {}, "metrics": {}, "files": {}}))


def test_the_front_door_rebuilds_another_world_only_with_force_beside_it_and_swaps_it_in(tmp_path, monkeypatch):
    """The generator itself is tested above (minutes); here it writes a stand-in world, so that the
    refusal, the build beside and the swap are what is tested."""
    built = []
    monkeypatch.setattr("pipeline.tinyworld.__main__.generate",
                        lambda out, seed=0: built.append(out) or _fake_world(out, seed, "new"))
    out = tmp_path / "tiny"
    _fake_world(out, seed=1, note="old")
    with pytest.raises(SystemExit, match="holds the world of seed 1, not 0; rerun with --force"):
        main(["--out", str(out)])
    assert built == []
    with open(out / "note.txt") as reader:  # a job reading the old world
        main(["--out", str(out), "--force"])
        assert reader.read() == "old"
    assert built == [tmp_path / ".tiny.building"]
    assert (out / "note.txt").read_text() == "new" and json.loads((out / "world.json").read_text())["seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny.lock", "tiny"]
