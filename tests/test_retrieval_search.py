"""pipeline/retrieval/search.py and index.py: top-k search, self/near-duplicate filtering, the index folder."""
from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.retrieval.index import (
    CaptionTable,
    IndexFolderError,
    check_dim,
    check_model,
    load_caption_table,
    model_identity,
    open_index,
    projection_dim,
    read_index_info,
)
from pipeline.retrieval.search import jaccard, retrieve, search, words


def unit(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def make_index_folder(folder: Path, vectors: np.ndarray, texts: list[str], *, index_key: str = "Flat",
                      index_param: str = "", model: str = "hf_clip:clip", partitions: int = 2) -> Path:
    """An index folder in caption_index's layout, built with faiss directly (no retrieval env)."""
    folder.mkdir(parents=True)
    index = faiss.index_factory(vectors.shape[1], index_key, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    faiss.write_index(index, str(folder / "text.index"))
    (folder / "text.json").write_text(json.dumps({"index_key": index_key, "index_param": index_param}))
    (folder / "metadata").mkdir()
    bounds = np.linspace(0, len(texts), partitions + 1).astype(int)
    for n, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        pq.write_table(pa.table({"caption": texts[lo:hi], "caption_id": [f"c{i}" for i in range(lo, hi)],
                                 "source": ["test"] * (hi - lo), "toxic": [i % 10 == 9 for i in range(lo, hi)]}),
                       folder / "metadata" / f"metadata_{n}.parquet")
    (folder / "stats.json").write_text(json.dumps({
        "complete": True, "model": model, "model_identity": model_identity(model),
        "embedding_dim": vectors.shape[1], "n_vectors": len(vectors)}))
    return folder


def table(texts, toxic=None) -> CaptionTable:
    return CaptionTable(list(texts), [f"c{i}" for i in range(len(texts))],
                        np.array(toxic if toxic is not None else [False] * len(texts)))


CAPTIONS = table(["a dog on the beach", "a dog on a beach", "a red bus in the city", "two cats on a sofa",
                  "a harmful recipe snippet", "a green tree"], toxic=[False, False, False, False, True, False])


def hits_of(order, k=3, ground_truth=None, own=frozenset(), threshold=0.8):
    ids = np.array(order + [-1] * 2)
    scores = np.linspace(0.9, 0.1, len(ids)).astype(np.float32)
    return retrieve(ids, scores, CAPTIONS, ground_truth=ground_truth, own_caption_ids=own, k=k,
                    near_duplicate_jaccard=threshold)


def test_word_sets_ignore_case_and_punctuation():
    assert words("A dog, on THE beach!") == {"a", "dog", "on", "the", "beach"}
    assert jaccard(words("a dog on the beach"), words("a dog on a beach")) == pytest.approx(0.8)


def test_near_duplicates_of_the_ground_truth_are_skipped_and_counted():
    truth, hits, dropped = hits_of([1, 0, 2, 3, 5], ground_truth="A dog on the beach.")
    assert truth == "A dog on the beach."
    assert [h.caption_id for h in hits] == ["c2", "c3", "c5"]
    assert dropped == 2


def test_the_samples_own_caption_id_is_skipped_even_when_the_text_differs():
    _, hits, dropped = hits_of([2, 3, 5], own=frozenset({"c2"}), ground_truth="something unrelated")
    assert [h.caption_id for h in hits] == ["c3", "c5"] and dropped == 1


def test_hits_keep_score_order_and_stop_at_k_and_at_missing_ids():
    _, hits, _ = hits_of([3, 2, 4], k=2, ground_truth="x")
    assert [h.caption_id for h in hits] == ["c3", "c2"] and hits[0].score > hits[1].score
    _, hits, _ = hits_of([3], k=3, ground_truth="x")  # faiss pads with -1 when the index is small
    assert [h.caption_id for h in hits] == ["c3"]
    assert hits_of([4], ground_truth="x")[1][0].toxic


def test_without_ground_truth_the_best_hit_becomes_the_caption_and_its_near_duplicates_go():
    truth, hits, dropped = hits_of([0, 1, 2, 3], k=2, ground_truth=None)
    assert truth == "a dog on the beach"
    assert [h.caption_id for h in hits] == ["c2", "c3"] and dropped == 1


def test_unlabelled_eval_images_keep_their_best_hits_and_get_no_caption():
    truth, hits, dropped = retrieve(np.array([0, 1, 2, 3]), np.array([0.9, 0.8, 0.7, 0.6], np.float32), CAPTIONS,
                                    ground_truth=None, own_caption_ids=frozenset(), k=2,
                                    near_duplicate_jaccard=0.8, caption_from_retrieval=False)
    assert truth is None and [h.caption_id for h in hits] == ["c0", "c1"] and dropped == 0


def test_hit_json_is_the_shard_contract():
    _, hits, _ = hits_of([2], ground_truth="x")
    assert set(hits[0].as_json()) == {"text", "score", "caption_id"}


def test_search_matches_exact_inner_product_and_normalises_queries():
    rng = np.random.default_rng(0)
    corpus = unit(rng.normal(size=(300, 16)))
    index = faiss.IndexFlatIP(16)
    index.add(corpus)
    queries = rng.normal(size=(7, 16)).astype(np.float16) * 5  # clip-retrieval writes float16
    scores, ids = search(index, queries, candidates=5, batch_size=3)
    expected = np.argsort(-(unit(queries.astype(np.float32)) @ corpus.T), axis=1)[:, :5]
    assert (ids == expected).all()
    assert scores.max() <= 1.0 + 1e-5 and (np.diff(scores, axis=1) <= 1e-6).all()


@pytest.mark.parametrize("index_key, index_param", [("Flat", ""), ("IVF8,Flat", "nprobe=8")])
def test_memory_mapped_index_returns_the_same_hits_as_in_memory(tmp_path, index_key, index_param):
    rng = np.random.default_rng(1)
    vectors = unit(rng.normal(size=(400, 8)))
    folder = make_index_folder(tmp_path / "index", vectors, [f"t{i}" for i in range(400)],
                               index_key=index_key, index_param=index_param)
    mapped = open_index(read_index_info(folder))
    in_memory = faiss.read_index(str(folder / "text.index"))
    faiss.ParameterSpace().set_index_parameters(in_memory, "nprobe=8" if index_param else "")
    queries = unit(rng.normal(size=(20, 8)))
    assert (search(mapped, queries, 4, 64)[1] == in_memory.search(queries, 4)[1]).all()
    if index_param:
        assert faiss.extract_index_ivf(mapped).nprobe == 8  # autofaiss' tuned setting is applied


def test_caption_table_maps_index_rows_through_partitions_in_name_order(tmp_path):
    rng = np.random.default_rng(2)
    texts = [f"caption {i}" for i in range(30)]
    folder = make_index_folder(tmp_path / "index", unit(rng.normal(size=(30, 4))), texts, partitions=3)
    captions = load_caption_table(read_index_info(folder))
    assert captions.texts == texts and captions.caption_ids[17] == "c17" and captions.toxic[9]


@pytest.mark.parametrize("damage, missing", [
    (lambda f: (f / "stats.json").unlink(), "stats.json"),
    (lambda f: (f / "text.index").unlink(), "text.index"),
    (lambda f: [p.unlink() for p in (f / "metadata").iterdir()], "metadata"),
    (lambda f: (f / "stats.json").write_text('{"complete": false}'), "marked complete"),
])
def test_incomplete_index_folder_is_refused_naming_what_is_missing(tmp_path, damage, missing):
    folder = make_index_folder(tmp_path / "index", unit(np.eye(4)), ["a", "b", "c", "d"])
    damage(folder)
    with pytest.raises(IndexFolderError, match=f"incomplete.*{missing}.*caption_index"):
        read_index_info(folder)


def test_missing_index_folder_is_refused(tmp_path):
    with pytest.raises(IndexFolderError, match="missing or incomplete"):
        read_index_info(tmp_path / "nothing-here")


def test_metadata_rows_must_match_the_vectors(tmp_path):
    folder = make_index_folder(tmp_path / "index", unit(np.eye(4)), ["a", "b", "c", "d"])
    stats = json.loads((folder / "stats.json").read_text())
    (folder / "stats.json").write_text(json.dumps({**stats, "n_vectors": 5}))
    with pytest.raises(IndexFolderError, match="4 rows for 5 vectors"):
        load_caption_table(read_index_info(folder))


def test_embedding_dimension_mismatch_is_a_clear_error(tmp_path):
    info = read_index_info(make_index_folder(tmp_path / "index", unit(np.eye(4)), ["a", "b", "c", "d"]))
    check_dim(info, 4, "images")
    with pytest.raises(IndexFolderError, match="dimension mismatch: images has dimension 768.*4-d vectors"):
        check_dim(info, 768, "images")


def test_model_identity_follows_the_folder_contents_not_the_spelling(tmp_path, monkeypatch):
    model = tmp_path / "clip"
    model.mkdir()
    (model / "config.json").write_text('{"projection_dim": 32}')
    (model / "model.safetensors").write_bytes(b"x" * 10)
    monkeypatch.chdir(tmp_path)
    assert model_identity("hf_clip:clip") == model_identity(f"hf_clip:{model}") == model_identity("hf_clip:./clip")
    assert projection_dim("hf_clip:clip") == 32 and projection_dim("open_clip:ViT-L-14-336/openai") is None
    info = read_index_info(make_index_folder(tmp_path / "index", unit(np.eye(4)), list("abcd"), model="hf_clip:clip"))
    check_model(info, f"hf_clip:{model}")
    (model / "model.safetensors").write_bytes(b"x" * 11)  # another checkpoint
    with pytest.raises(IndexFolderError, match="CLIP model mismatch"):
        check_model(info, "hf_clip:clip")
    with pytest.raises(IndexFolderError, match="open_clip:ViT-L-14-336/openai"):
        check_model(info, "open_clip:ViT-L-14-336/openai")
