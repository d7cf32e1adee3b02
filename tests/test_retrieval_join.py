"""Stage retrieval_join (stages/retrieval_join.py → pipeline/retrieval/{pack,join,parts}.py).

Fast tests: image checks, packing, slicing, merging, and every whole-input error (raised before
any work). The slow test joins a mix665k-style input salted with every per-sample problem, as a
two-task job array, with the real clip-retrieval on the tiny world.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.llava import LlavaSample, RawRecord, validate_records
from pipeline.data.shards import ShardCountWarning, iter_shard, shard_name
from pipeline.retrieval import pack, parts
from pipeline.retrieval.index import CaptionTable
from pipeline.retrieval.join import _SampleWriter, slice_shards
from pipeline.retrieval.search import jaccard, words
from stages import retrieval_join
from tests.test_retrieval_search import make_index_folder, unit

REPO = Path(__file__).resolve().parent.parent


def encoded(fmt: str, color=(10, 200, 10), size=(12, 9)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


def record(i, image=None, question="<image>\nWhat is shown?", answer="A green square."):
    value = {"id": f"s{i}", "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        value["image"] = image
    return value


# ---- step a: images and packing -----------------------------------------------------------------

def test_jpeg_is_kept_byte_for_byte(tmp_path):
    (tmp_path / "a.jpg").write_bytes(data := encoded("JPEG"))
    assert pack.load_image(tmp_path / "a.jpg", 95) == (data, "", "")


@pytest.mark.parametrize("name", ["a.png", "misnamed.jpg"])
def test_png_is_reencoded_as_jpeg_whatever_its_name(tmp_path, name):
    (tmp_path / name).write_bytes(encoded("PNG"))
    data, reason, _ = pack.load_image(tmp_path / name, 95)
    assert reason == "" and Image.open(io.BytesIO(data)).format == "JPEG"
    assert Image.open(io.BytesIO(data)).size == (12, 9)


@pytest.mark.parametrize("content", [encoded("JPEG", size=(64, 64))[:300], b"not an image at all"])
def test_corrupt_or_truncated_image_is_unreadable(tmp_path, content):
    (tmp_path / "bad.jpg").write_bytes(content)
    data, reason, detail = pack.load_image(tmp_path / "bad.jpg", 95)
    assert data is None and reason == "unreadable_image" and "bad.jpg" in detail


def test_missing_image_is_reported(tmp_path):
    assert pack.load_image(tmp_path / "nope.jpg", 95)[:2] == (None, "missing_image")


def test_packing_writes_one_consecutively_numbered_staging_tar_per_shard_with_images(tmp_path):
    root = tmp_path / "images"
    (root / "g").mkdir(parents=True)
    (root / "g" / "ok.jpg").write_bytes(encoded("JPEG"))
    (root / "g" / "ok.png").write_bytes(encoded("PNG"))
    items = validate_records([RawRecord(0, record(0, "g/ok.jpg")), RawRecord(1, record(1, question="Hi?")),
                              RawRecord(2, record(2, "g/missing.jpg")), RawRecord(3, record(3, "g/ok.png")),
                              RawRecord(4, record(4, "g/ok.jpg", question="no token"))])
    shards = [(0, items[:2]), (1, items[2:3]), (2, items[3:])]
    plans, rejects = pack.pack_shards(shards, root, tmp_path / "staging", 95, workers=1)
    assert [(p.index, [s.key for s in p.samples]) for p in plans] == [(0, ["s0", "s1"]), (1, []), (2, ["s3"])]
    assert [p.staging.name if p.staging else None for p in plans] == ["images-000000.tar", None, "images-000001.tar"]
    assert [(r.key, r.reason) for r in rejects] == [("s2", "missing_image"), ("s4", "image_token_missing")]
    staged = list(iter_shard(plans[2].staging))
    assert staged[0].meta == {"key": "s3"} and Image.open(io.BytesIO(staged[0].image)).format == "JPEG"


def test_packing_with_worker_processes_gives_the_same_tars(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(6):
        (root / f"{i}.png").write_bytes(encoded("PNG", color=(i * 40, 0, 0)))
    items = validate_records([RawRecord(i, record(i, f"{i}.png")) for i in range(6)])
    one, _ = pack.pack_shards([(0, items)], root, tmp_path / "a", 95, workers=1)
    two, _ = pack.pack_shards([(0, items)], root, tmp_path / "b", 95, workers=2)
    assert one[0].staging.read_bytes() == two[0].staging.read_bytes()


# ---- slices and merge ---------------------------------------------------------------------------

@pytest.mark.parametrize("n_records, per_shard, count", [(1000, 64, 3), (10, 4, 5), (64, 64, 1), (5, 10, 2)])
def test_slices_partition_the_shards_whatever_the_task_count(n_records, per_shard, count):
    ranges = [slice_shards(n_records, per_shard, i, count) for i in range(count)]
    flat = [n for r in ranges for n in r]
    assert flat == list(range(-(-n_records // per_shard)))


def part_stats(fingerprint, inp, written, rejected, shards):
    return {"fingerprint": fingerprint, "counts": {"input": inp, "written": written, "rejected": rejected,
                                                   "with_image": written, "text_only": 0},
            "shards": shards, "durations_s": {"total": 1.0}, "source": "s", "input": "i", "index": "x",
            "model": "m", "k": 3, "image_caption": "answer"}


def test_merge_waits_for_every_slice_then_sums_counts_and_removes_stale_shards(tmp_path):
    from pipeline.data.shards import write_manifest, write_rejects, write_stats
    out = tmp_path / "shards"
    (out / "train-000009.tar").parent.mkdir(parents=True)
    (out / "train-000009.tar").write_bytes(b"left by a run with other settings")
    rows = [{"key": "a", "shard": shard_name(0), "offset": 0, "n_tokens": 3, "has_image": True, "source": "s"}]
    for i, stats in enumerate([part_stats("f", 3, 1, {"missing_image": 2}, [shard_name(0)]),
                               part_stats("f", 2, 1, {"duplicate_id": 1}, [shard_name(1)])]):
        part = parts.part_dir(out, parts.slice_name(i, 2))
        write_manifest(part / "manifest.parquet", rows)
        write_rejects(part / "rejects.parquet", [{"key": "r", "reason": "x"}])
        assert parts.merge_if_complete(out, 2, "f") is None or i == 1
        write_stats(part / "stats.json", stats)
    merged = parts.merge_if_complete(out, 2, "f")
    assert merged["counts"]["input"] == 5 and merged["counts"]["written"] == 2
    assert merged["counts"]["rejected"] == {"duplicate_id": 1, "missing_image": 2}
    assert merged["shards"] == [shard_name(0), shard_name(1)]
    assert not (out / "train-000009.tar").exists()
    assert pq.read_table(out / "manifest.parquet").num_rows == 2
    assert parts.merge_if_complete(out, 2, "another run") is None


def test_merge_refuses_counts_that_do_not_add_up():
    with pytest.raises(AssertionError, match="do not add up"):
        parts.merge_stats([part_stats("f", 3, 1, {"missing_image": 1}, [])])


# ---- step c: the sample json ----------------------------------------------------------------------

def test_stage1_samples_use_their_answer_as_caption_and_never_retrieve_it(tmp_path):
    from pipeline.config import load_config
    from pipeline.retrieval.config import RetrievalJoinConfig
    cfg = load_config(RetrievalJoinConfig, None, [f"input={tmp_path}", f"image_root={tmp_path}",
                                                  f"index_dir={tmp_path}", "clip_model=hf_clip:x", "search.k=2"])
    captions = CaptionTable(["a green square.", "a green square", "a red circle", "s7 own caption", "a blue star"],
                            ["c0", "c1", "c2", "s7", "c4"], np.array([False, False, True, False, False]))
    writer = _SampleWriter(cfg, captions, None, "lcs", {"s7": 0},
                           np.array([[0.9, 0.8, 0.7, 0.6, 0.5]], np.float32), np.array([[0, 3, 1, 2, 4]]))
    sample = LlavaSample("s7", "s7", 0, "a/s7.jpg", record(7, "a/s7.jpg", answer="A green square.")["conversations"])
    meta = writer.sample_json(sample)
    assert meta["image_caption"] == "A green square."
    assert [hit["caption_id"] for hit in meta["retrieved"]] == ["c2", "c4"]
    assert meta["toxic"] is True and writer.counts["dropped_self_or_near_duplicate"] == 3
    assert set(meta) >= {"key", "source", "conversations", "image_caption", "retrieved", "toxic"}


def test_eval_images_without_a_caption_keep_the_top_hits_and_never_take_the_answer_as_caption(tmp_path):
    from pipeline.config import load_config
    from pipeline.retrieval.config import RetrievalJoinConfig
    cfg = load_config(RetrievalJoinConfig, None, [f"input={tmp_path}", f"image_root={tmp_path}",
                                                  f"index_dir={tmp_path}", "clip_model=hf_clip:x", "search.k=2",
                                                  "image_caption=none"])
    captions = CaptionTable(["I'm sorry, I cannot help with that.", "a toxic recipe", "a blue star"],
                            ["c0", "c1", "c2"], np.array([False, True, False]))
    writer = _SampleWriter(cfg, captions, None, "bench", {"s1": 0},
                           np.array([[0.9, 0.8, 0.7]], np.float32), np.array([[0, 1, 2]]))
    refusal = record(1, "a/s1.jpg", answer="I'm sorry, I cannot help with that.")["conversations"]
    meta = writer.sample_json(LlavaSample("s1", "s1", 0, "a/s1.jpg", refusal))
    assert meta["image_caption"] == ""  # the refusal of a toxic record is no caption of its picture
    assert [hit["caption_id"] for hit in meta["retrieved"]] == ["c0", "c1"] and meta["toxic"] is True
    assert writer.counts["caption_from_retrieval"] == 0 and writer.counts["dropped_self_or_near_duplicate"] == 0


# ---- whole-input errors: before any work -----------------------------------------------------------

@pytest.fixture
def small_world(tmp_path):
    """A fake CLIP folder, a complete 32-d index of it, one image and a valid input file."""
    model = tmp_path / "clip"
    model.mkdir()
    (model / "config.json").write_text('{"projection_dim": 32}')
    (model / "model.safetensors").write_bytes(b"weights")
    vectors = unit(np.random.default_rng(0).normal(size=(40, 32)))
    index = make_index_folder(tmp_path / "index", vectors, [f"caption {i}" for i in range(40)],
                              model=f"hf_clip:{model}")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(encoded("JPEG"))
    (tmp_path / "in.json").write_text(json.dumps([record(0, "a.jpg")]))
    return tmp_path, model, index


def join_args(root: Path, model: Path, index: Path, *extra: str) -> list[str]:
    return [f"input={root / 'in.json'}", f"image_root={root / 'images'}", f"index_dir={index}",
            f"clip_model=hf_clip:{model}", f"output_dir={root / 'out'}",
            f"retrieval_python={REPO / '.retrieval-venv' / 'bin' / 'python'}", *extra]


def assert_refused(args, message):
    with pytest.raises(SystemExit, match=message):
        retrieval_join.main(args)


def test_missing_index_folder_is_refused(small_world):
    root, model, _ = small_world
    assert_refused(join_args(root, model, root / "nowhere"), "index_dir.*path does not exist")


def test_incomplete_index_folder_is_refused_before_work(small_world):
    root, model, index = small_world
    (index / "text.index").unlink()
    assert_refused(join_args(root, model, index), "missing or incomplete.*text.index.*run the caption_index stage")
    assert not (root / "out").exists()


def test_other_clip_model_than_the_index_is_refused(small_world, tmp_path):
    root, model, index = small_world
    other = tmp_path / "other-clip"
    other.mkdir()
    (other / "config.json").write_text('{"projection_dim": 32, "other": 1}')
    assert_refused(join_args(root, other, index), "CLIP model mismatch")


def test_embedding_dimension_mismatch_is_refused_before_embedding(small_world):
    root, model, _ = small_world  # the model declares 32-d embeddings; this index holds 16-d ones
    index = make_index_folder(root / "index16", unit(np.random.default_rng(1).normal(size=(40, 16))),
                              [f"caption {i}" for i in range(40)], model=f"hf_clip:{model}")
    assert_refused(join_args(root, model, index), "dimension mismatch.*has dimension 32.*16-d vectors")


@pytest.mark.parametrize("content, message", [("[{broken", "malformed JSON at line 1"), ("[]", "no records"),
                                              ('{"id": 1}', "expected a JSON array")])
def test_unreadable_or_empty_input_file_is_refused(small_world, content, message):
    root, model, index = small_world
    (root / "in.json").write_text(content)
    assert_refused(join_args(root, model, index), message)


def test_missing_retrieval_environment_is_refused(small_world):
    root, model, index = small_world
    assert_refused(join_args(root, model, index, f"retrieval_python={root / 'no' / 'python'}"), "make retrieval-env")


def test_caption_map_mode_without_a_map_is_a_config_error(small_world):
    root, model, index = small_world
    assert_refused(join_args(root, model, index, "image_caption=caption_map"), "caption_map needs a caption_map file")


# ---- the real thing (the session's tiny index: tests/conftest.py) --------------------------------

def salted_input(world, root: Path) -> tuple[Path, Path, dict[str, str]]:
    """Stage-2 records, 64 per shard: shard 0 = 56 image records + 8 broken ones, shard 1 = the
    text-only chats + records with no usable image (so slice 1 needs no embedding at all)."""
    records = json.loads(world.stage2_json.read_text())
    images = root / "images"
    images.mkdir()
    for group in ("coco", "gqa", "vg"):
        (images / group).symlink_to(world.images / group)
    (images / "broken").mkdir()
    (images / "broken" / "truncated.jpg").write_bytes((world.images / records[1]["image"]).read_bytes()[:200])
    with_image = [r for r in records if "image" in r]
    text_only = [r for r in records if "image" not in r]
    base = with_image[0]
    bad = {
        "bad-missing": {**base, "id": "bad-missing", "image": "coco/train2017/does-not-exist.jpg"},
        "bad-truncated": {**base, "id": "bad-truncated", "image": "broken/truncated.jpg"},
        "bad-noconv": {"id": "bad-noconv", "image": base["image"]},
        "bad-twice": {**base, "id": "bad-twice", "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhat?"}, {"from": "gpt", "value": "Two."}]},
        "bad-notoken": {**base, "id": "bad-notoken", "conversations": [
            {"from": "human", "value": "What?"}, {"from": "gpt", "value": "Nothing."}]},
        "bad-texttoken": {"id": "bad-texttoken", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Nothing."}]},
        "bad-path": {**base, "id": "bad-path", "image": "../outside.jpg"},
    }
    shard0 = with_image[:56] + [bad["bad-missing"], bad["bad-truncated"], bad["bad-noconv"], bad["bad-twice"],
                                bad["bad-notoken"], {**base}, "not an object", bad["bad-path"]]
    shard1 = text_only[:63] + [bad["bad-texttoken"]]
    path = root / "salted.json"
    path.write_text(json.dumps(shard0 + shard1))
    reasons = {"bad-missing": "missing_image", "bad-truncated": "unreadable_image",
               "bad-noconv": "missing_conversations",
               "bad-twice": "image_token_repeated", "bad-notoken": "image_token_missing",
               "bad-texttoken": "image_token_without_image", "bad-path": "bad_image_path",
               base["id"]: "duplicate_id", "record-000000062": "not_an_object"}
    return path, images, reasons


@pytest.mark.slow
def test_join_as_a_two_task_array_writes_every_sample_or_a_reason(tiny_world, tiny_index, tmp_path, capsys):
    salted, images, reasons = salted_input(tiny_world, tmp_path)
    out = tmp_path / "shards"
    args = ["--config", str(REPO / "configs/tiny/retrieval_join_stage2.yaml"), f"input={salted}",
            f"image_root={images}", f"index_dir={tiny_index[0]}", f"clip_model=hf_clip:{tiny_world.clip}",
            f"caption_map={tiny_world.image_captions}", f"output_dir={out}", "samples_per_shard=64",
            "slice.count=2", "training.world_size=4", "training.loader_workers=2",
            f"retrieval_python={REPO / '.retrieval-venv' / 'bin' / 'python'}"]
    first = retrieval_join.main([*args, "slice.index=1"])  # text-only slice: no embedding needed
    assert first["merged"] is None and "embed" not in first["durations_s"]
    with pytest.warns(ShardCountWarning, match=r"only 2 shard\(s\) for 4 rank\(s\) × 2 loader worker\(s\)"):
        second = retrieval_join.main([*args, "slice.index=0"])
    merged = second["merged"]
    n_input = len(json.loads(salted.read_text()))

    # Nothing silently dropped: written + rejected == input, and each reject has its reason.
    rejects = {row["key"]: row["reason"] for row in pq.read_table(out / "rejects.parquet").to_pylist()}
    assert rejects == reasons
    assert merged["counts"]["written"] + sum(merged["counts"]["rejected"].values()) == n_input
    assert merged["shards"] == [shard_name(0), shard_name(1)]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["counts"] == merged["counts"] and stats["counts"]["text_only"] > 0

    # Manifest rows are exactly the shards' samples, at their offsets.
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    read = [(shard, offset, sample) for shard in merged["shards"]
            for offset, sample in enumerate(iter_shard(out / shard))]
    assert [(m["key"], m["shard"], m["offset"], m["has_image"]) for m in manifest] == [
        (s.key, shard, offset, s.image is not None) for shard, offset, s in read]
    assert len(manifest) == merged["counts"]["written"]

    caption_map = {r["image"]: r["caption"] for r in pq.read_table(tiny_world.image_captions).to_pylist()}
    toxic_ids = {r["caption_id"] for r in pq.read_table(tiny_world.captions).to_pylist() if r["toxic"]}
    for _, _, sample in read:
        meta = sample.meta
        assert set(meta) >= {"key", "source", "conversations", "image_caption", "retrieved", "toxic"}
        if sample.image is None:
            assert meta["image"] is None and meta["retrieved"] == [] and meta["image_caption"] == ""
            continue
        assert Image.open(io.BytesIO(sample.image)).format == "JPEG"
        source_bytes = (tiny_world.images / meta["image"]).read_bytes()
        if source_bytes[:2] == b"\xff\xd8":
            assert sample.image == source_bytes  # JPEG sources are not re-encoded
        assert meta["image_caption"] == caption_map[meta["image"]]
        hits = meta["retrieved"]
        assert len(hits) == 3 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        assert all(jaccard(words(h["text"]), words(meta["image_caption"])) < 0.8 for h in hits)
        assert meta["toxic"] == any(h["caption_id"] in toxic_ids for h in hits)
    png_sources = [s for _, _, s in read
                   if s.image is not None and (tiny_world.images / s.meta["image"]).read_bytes()[:4] == b"\x89PNG"]
    assert png_sources  # the tiny world has PNGs, some named .jpg: all came out as JPEG above

    # A finished slice is not redone; the summary line names counts, reasons and shards.
    with pytest.warns(ShardCountWarning):
        again = retrieval_join.main([*args, "slice.index=0"])
    assert again["skipped"]
    out_text = capsys.readouterr().out
    assert "rejected 9 (bad_image_path=1, duplicate_id=1" in out_text and "2 shards" in out_text


# ---- launch script: Slurm array → slice config ---------------------------------------------------

def launch(script: str, env: dict[str, str], *args: str) -> str:
    """Run a launch script with PYTHON=echo: what it would run, as one line."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", str(REPO / "launch" / script), *args], env={**base, "PYTHON": "echo", **env},
                            capture_output=True, text=True, check=True)
    return result.stdout.strip().splitlines()[-1]


def test_array_task_becomes_the_slice_of_the_join():
    line = launch("retrieval_join.sh", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}, "search.k=1")
    assert line == ("-m stages.retrieval_join --config configs/retrieval_join.yaml "
                    "slice.index=3 slice.count=8 search.k=1")


def test_without_slurm_the_join_runs_one_slice_and_overrides_reach_the_stage():
    line = launch("retrieval_join.sh", {"CONFIG": "configs/tiny/retrieval_join_stage1.yaml",
                                        "RETRIEVAL_PYTHON": "/opt/retr/bin/python"})
    assert line == ("-m stages.retrieval_join --config configs/tiny/retrieval_join_stage1.yaml slice.index=0 "
                    "slice.count=1 retrieval_python=/opt/retr/bin/python")
    assert launch("caption_index.sh", {}, "index.index_key=Flat") == (
        "-m stages.caption_index --config configs/caption_index.yaml index.index_key=Flat")
