"""Stage caption_index (stages/caption_index.py → pipeline/retrieval/{corpus,clip_env,build}.py).

Fast tests cover the corpus rules, the subprocess argument plumbing and every whole-input error;
the slow ones build the tiny world's index with the real clip-retrieval + autofaiss.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import load_config
from pipeline.retrieval import build
from pipeline.retrieval.clip_env import (RetrievalEnvError, _fire_args, brace_pattern, check_retrieval_python,
                                         clip_model_argument)
from pipeline.retrieval.config import CaptionIndexConfig
from pipeline.retrieval.corpus import (Caption, CorpusError, clean_corpus, normalize_text, read_caption_map,
                                       read_captions, write_clip_input_tars)
from pipeline.retrieval.index import load_caption_table, open_index, read_index_info
from stages import caption_index
from tests.conftest import caption_index_args

REPO = Path(__file__).resolve().parent.parent


# ---- corpus -----------------------------------------------------------------------------------

def test_normalisation_collapses_whitespace_and_drops_invisible_characters():
    assert normalize_text("  A\u200b dog\t on\nthe beach \ufeff") == "A dog on the beach"
    assert normalize_text("Cafe\u0301") == "Caf\u00e9"  # NFC: one code point, so duplicates compare equal


def test_exact_duplicates_and_empty_texts_are_dropped_and_counted():
    captions = [Caption("1", "a dog", "s", False), Caption("2", " a  dog ", "s", False),
                Caption("3", "\u200b", "s", False), Caption("4", "a cat", "s", False),
                Caption("t1", "a dog", "toxic", True)]
    kept, counts = clean_corpus(captions)
    assert [(c.caption_id, c.text) for c in kept] == [("1", "a dog"), ("4", "a cat")]
    assert kept[0].toxic  # a duplicate toxic snippet keeps the entry marked toxic
    assert counts == {"input": 5, "empty_text": 1, "duplicate_text": 2, "indexed": 2}


def test_empty_corpus_is_an_error():
    with pytest.raises(CorpusError, match="empty caption corpus"):
        clean_corpus([Caption("1", "   ", "s", False)])


def test_one_caption_id_for_two_texts_is_an_error():
    with pytest.raises(CorpusError, match="caption_id '1' is used for two different texts"):
        clean_corpus([Caption("1", "a dog", "s", False), Caption("1", "a cat", "s", False)])


def test_parquet_jsonl_and_txt_corpora_are_read(tmp_path):
    pq.write_table(pa.table({"caption_id": [7, 8], "text": ["a", "b"], "toxic": [False, True]}), tmp_path / "c.parquet")
    (tmp_path / "c.jsonl").write_text('{"caption_id": "x", "text": "a", "source": "cc3m"}\n\n')
    (tmp_path / "snippets.txt").write_text("bad thing one\n\nbad thing two\n")
    assert read_captions(tmp_path / "c.parquet") == [Caption("7", "a", "c", False), Caption("8", "b", "c", True)]
    assert read_captions(tmp_path / "c.jsonl") == [Caption("x", "a", "cc3m", False)]
    snippets = read_captions(tmp_path / "snippets.txt", toxic=True, require_ids=False)
    assert [(s.caption_id, s.toxic) for s in snippets] == [("snippets-000000000", True), ("snippets-000000001", True)]


@pytest.mark.parametrize("content, message", [
    ('{"caption_id": "1", "text": "a"}\n{oops\n', r"c.jsonl:2: not a UTF-8 JSON object"),
    ('{"caption_id": "1", "txt": "a"}\n', "row 0 has no 'text' field"),
    ('{"text": "a"}\n', "row 0 has no caption_id"),
    ('{"caption_id": "1", "text": 5}\n', "text is int"),
])
def test_bad_corpus_rows_are_errors_naming_file_and_row(tmp_path, content, message):
    (tmp_path / "c.jsonl").write_text(content)
    with pytest.raises(CorpusError, match=message):
        read_captions(tmp_path / "c.jsonl")


def test_caption_map_reads_image_to_caption(tmp_path):
    pq.write_table(pa.table({"image": ["coco/a.jpg"], "caption": [" a  dog "]}), tmp_path / "m.parquet")
    assert read_caption_map(tmp_path / "m.parquet") == {"coco/a.jpg": "a dog"}
    pq.write_table(pa.table({"image": ["coco/a.jpg"]}), tmp_path / "bad.parquet")
    with pytest.raises(CorpusError, match="needs string fields image and caption"):
        read_caption_map(tmp_path / "bad.parquet")


def test_clip_input_tars_carry_the_caption_id_in_json(tmp_path):
    captions = [Caption(f"id.{i}", f"text {i}", "s", i == 2) for i in range(5)]
    tars = write_clip_input_tars(captions, tmp_path, per_tar=2)
    assert [t.name for t in tars] == ["corpus-000000.tar", "corpus-000001.tar", "corpus-000002.tar"]
    with tarfile.open(tars[1]) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000000002.json").read())
    assert names == ["000000002.txt", "000000002.json", "000000003.txt", "000000003.json"]
    assert meta == {"caption_id": "id.2", "source": "s", "toxic": True}


# ---- retrieval-environment plumbing -------------------------------------------------------------

def test_brace_pattern_covers_consecutive_tars_and_refuses_gaps(tmp_path):
    tars = [tmp_path / f"images-{i:06d}.tar" for i in (3, 4, 5)]
    assert brace_pattern(tars) == f"{tmp_path.resolve()}/images-{{000003..000005}}.tar"
    assert brace_pattern(tars[:1]) == str(tars[0].resolve())
    with pytest.raises(ValueError, match="not consecutively numbered"):
        brace_pattern([tars[0], tars[2]])


def test_string_arguments_reach_fire_as_quoted_literals():
    # Unquoted, fire would parse "IVF256,Flat" as a tuple and "{0..2}" as a set.
    args = _fire_args({"index_key": "IVF256,Flat", "input_dataset": "/d/c-{0..2}.tar", "use_jit": False, "n": 3})
    assert args == ['--index_key="IVF256,Flat"', '--input_dataset="/d/c-{0..2}.tar"', "--use_jit=False", "--n=3"]


def test_local_model_folders_are_passed_as_absolute_paths(tmp_path, monkeypatch):
    (tmp_path / "clip").mkdir()
    monkeypatch.chdir(tmp_path)
    assert clip_model_argument("hf_clip:clip") == f"hf_clip:{(tmp_path / 'clip').resolve()}"
    assert clip_model_argument("open_clip:ViT-L-14-336/openai") == "open_clip:ViT-L-14-336/openai"
    with pytest.raises(RetrievalEnvError, match="does not exist"):
        clip_model_argument("hf_clip:./missing/clip")


def test_missing_retrieval_environment_is_a_clear_error(tmp_path):
    with pytest.raises(RetrievalEnvError, match="make retrieval-env"):
        check_retrieval_python(tmp_path / "venv" / "bin" / "python")


# ---- stage: whole-input errors before any work -------------------------------------------------

def small_corpus(tmp_path, texts) -> Path:
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps({"caption_id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def test_stage_refuses_an_empty_corpus_before_running_anything(tmp_path, retrieval_python):
    args = ["captions=" + str(small_corpus(tmp_path, ["", "  "])), "clip_model=hf_clip:x",
            f"output_dir={tmp_path / 'index'}", f"retrieval_python={retrieval_python}"]
    with pytest.raises(SystemExit, match="caption_index: empty caption corpus"):
        caption_index.main(args)
    assert not (tmp_path / "index").exists() and not (tmp_path / "index.partial").exists()


def test_stage_refuses_a_missing_retrieval_environment(tmp_path):
    args = ["captions=" + str(small_corpus(tmp_path, ["a dog"])), "clip_model=hf_clip:x",
            f"output_dir={tmp_path / 'index'}", f"retrieval_python={tmp_path / 'nope' / 'python'}"]
    with pytest.raises(SystemExit, match="retrieval environment not found"):
        caption_index.main(args)


def test_stage_never_deletes_a_folder_that_is_not_an_index(tmp_path, retrieval_python):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("...")
    args = ["captions=" + str(small_corpus(tmp_path, ["a dog"])), "clip_model=hf_clip:x",
            f"output_dir={tmp_path / 'precious'}", f"retrieval_python={retrieval_python}"]
    with pytest.raises(SystemExit, match="thesis.tex"):
        caption_index.main(args)
    assert (tmp_path / "precious" / "thesis.tex").exists()


def test_existing_output_state_is_absent_incomplete_outdated_or_up_to_date(tmp_path):
    folder = tmp_path / "index"
    assert build.existing_state(folder, "f")[0] == "absent"
    (folder / "metadata").mkdir(parents=True)
    (folder / "metadata" / "metadata_0.parquet").write_bytes(b"")
    for name in ("text.index", "text.json"):
        (folder / name).write_bytes(b"")
    assert build.existing_state(folder, "f")[0] == "incomplete"
    (folder / "stats.json").write_text(json.dumps({"complete": True, "fingerprint": "old"}))
    assert build.existing_state(folder, "f")[0] == "outdated"
    assert build.existing_state(folder, "old")[0] == "up_to_date"


def test_fingerprint_changes_with_corpus_and_index_options(tmp_path):
    path = small_corpus(tmp_path, ["a dog"])
    cfg = load_config(CaptionIndexConfig, None, [f"captions={path}", "clip_model=hf_clip:x"])
    other_options = load_config(CaptionIndexConfig, None,
                                [f"captions={path}", "clip_model=hf_clip:x", "index.index_key=Flat"])
    before = build.fingerprint(cfg)
    assert before == build.fingerprint(cfg) != build.fingerprint(other_options)
    small_corpus(tmp_path, ["a cat"])
    assert build.fingerprint(cfg) != before


# ---- stage: the real thing on the tiny world ----------------------------------------------------

@pytest.mark.slow
def test_tiny_index_is_built_over_a_half_written_output(tiny_index, tiny_world):
    output_dir, stats = tiny_index
    assert not stats["skipped"]
    assert sorted(p.name for p in output_dir.iterdir()) == ["logs", "metadata", "stats.json", "text.index", "text.json"]
    assert not output_dir.with_name("index.partial").exists()
    texts = pq.read_table(tiny_world.captions).column("text").to_pylist()
    counts = stats["counts"]
    # one vector per distinct text: the toxic snippets file repeats corpus rows, and two scenes may
    # share a caption
    assert counts["indexed"] == stats["n_vectors"] == len(set(texts))
    assert counts["duplicate_text"] == counts["toxic"] + len(texts) - len(set(texts)) and counts["toxic"] > 0
    assert stats["embedding_dim"] == 32 and stats["index_key"] == "Flat"


@pytest.mark.slow
def test_index_rows_map_back_to_their_captions_through_the_metadata(tiny_index, tiny_world):
    """Re-embed captions here and compare with the vectors at their metadata rows: the row order
    clip-retrieval produced is only trusted through metadata."""
    from transformers import CLIPModel, CLIPTokenizer
    from pipeline.tinyworld.models import clip_token_ids

    info = read_index_info(tiny_index[0])
    table = load_caption_table(info)
    index = open_index(info)
    rows = np.random.default_rng(0).choice(info.n_vectors, 40, replace=False)
    model = CLIPModel.from_pretrained(tiny_world.clip).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_world.clip)
    with torch.no_grad():
        out = model.get_text_features(input_ids=clip_token_ids(tokenizer, [table.texts[r] for r in rows]))
    ours = torch.nn.functional.normalize(out if torch.is_tensor(out) else out.pooler_output, dim=-1).numpy()
    stored = np.stack([index.reconstruct(int(r)) for r in rows])
    assert (ours * stored).sum(axis=1).min() > 0.99
    toxic_ids = {row["caption_id"] for row in pq.read_table(tiny_world.captions).to_pylist() if row["toxic"]}
    assert {cid for cid, t in zip(table.caption_ids, table.toxic) if t} == toxic_ids


@pytest.mark.slow
def test_rerun_on_unchanged_input_does_nothing(tiny_index, tiny_world, retrieval_python, capsys):
    output_dir, _ = tiny_index
    before = {p: p.stat().st_mtime_ns for p in output_dir.rglob("*")}
    stats = caption_index.main(caption_index_args(tiny_world, output_dir, retrieval_python))
    assert stats["skipped"]
    assert "up to date, nothing done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in output_dir.rglob("*")} == before


@pytest.mark.slow
def test_index_file_searches_memory_mapped(tiny_index):
    info = read_index_info(tiny_index[0])
    index = open_index(info)
    assert index.ntotal == info.n_vectors
    query = np.stack([index.reconstruct(5)])
    assert index.search(query, 1)[1][0, 0] == 5
    assert isinstance(faiss.downcast_index(index), faiss.IndexFlatIP)
