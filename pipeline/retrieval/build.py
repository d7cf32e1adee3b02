"""caption_index: caption corpus → clip-retrieval text embeddings → autofaiss index folder.

The folder is built under `<output_dir>.partial` and renamed into place after stats.json (the
completion mark) is written: an output is complete or absent. A re-run whose inputs and settings
hash to the recorded fingerprint does nothing; a half-written or outdated output is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow.parquet as pq

from pipeline.config import to_dict

from . import clip_env, corpus, embeddings
from .config import CaptionIndexConfig
from .index import INDEX_FILES, missing_parts, model_identity

log = logging.getLogger(__name__)


def fingerprint(cfg: CaptionIndexConfig) -> str:
    """Hash of what determines the index: corpus bytes, model identity, index options."""
    digest = hashlib.sha256()
    corpus.hash_files(digest, (cfg.captions, cfg.toxic_snippets))
    digest.update(model_identity(cfg.clip_model).encode())
    digest.update(json.dumps(to_dict(cfg.index), sort_keys=True).encode())
    return digest.hexdigest()


def existing_state(output_dir: Path, expected_fingerprint: str) -> tuple[str, dict]:
    """("up_to_date" | "absent" | "incomplete" | "outdated", stats of the existing output)."""
    output_dir = Path(output_dir)
    if not output_dir.exists():
        return "absent", {}
    if missing_parts(output_dir):
        return "incomplete", {}
    stats = json.loads((output_dir / "stats.json").read_text())
    return ("up_to_date" if stats.get("fingerprint") == expected_fingerprint else "outdated"), stats


def run_caption_index(cfg: CaptionIndexConfig) -> dict[str, Any]:
    """Build (or keep) the index folder; returns its stats (with "skipped": True when kept)."""
    start = time.perf_counter()
    python = clip_env.check_retrieval_python(cfg.retrieval_python)
    output_dir = Path(cfg.output_dir)
    expected = fingerprint(cfg)
    state, stats = existing_state(output_dir, expected)
    if state == "up_to_date":
        log.info("index %s is complete and up to date with its inputs: nothing to do", output_dir)
        return {**stats, "skipped": True}
    _refuse_foreign_folder(output_dir)
    if state != "absent":
        log.info("index %s is %s: rebuilding it", output_dir, state)

    captions = corpus.read_captions(cfg.captions)
    if cfg.toxic_snippets is not None:
        captions += corpus.read_captions(cfg.toxic_snippets, toxic=True, require_ids=False)
    kept, counts = corpus.clean_corpus(captions)
    counts["toxic"] = sum(c.toxic for c in kept)
    durations = {"read": time.perf_counter() - start}
    log.info("corpus: %d rows, %d indexed (%d empty, %d duplicate texts dropped; %d toxic)",
             counts["input"], counts["indexed"], counts["empty_text"], counts["duplicate_text"], counts["toxic"])

    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    work = partial / "_work"
    tars = corpus.write_clip_input_tars(kept, work / "corpus", cfg.captions_per_tar)
    durations["inference"] = clip_env.run_inference(
        python, tars=tars, output_dir=work / "embeddings", modality="text", clip_model=cfg.clip_model,
        samples_per_tar=cfg.captions_per_tar, cfg=cfg.inference, log_path=partial / "logs" / "inference.log")
    dim = _check_embeddings(work / "embeddings", kept)
    durations["index"] = clip_env.build_index(python, embeddings_dir=work / "embeddings" / "text_emb",
                                              index_dir=partial, cfg=cfg.index,
                                              log_path=partial / "logs" / "index.log")
    (partial / "metadata").mkdir()
    for _, parquet in embeddings.partition_files(work / "embeddings", "text"):
        shutil.copy2(parquet, partial / "metadata" / parquet.name)
    infos = json.loads((partial / "text.json").read_text())
    index = faiss.read_index(str(partial / "text.index"))
    if index.ntotal != len(kept) or index.d != dim:
        raise clip_env.RetrievalEnvError(f"{partial / 'text.index'}: {index.ntotal} vectors of dim {index.d}, "
                                         f"expected {len(kept)} of dim {dim}")
    shutil.rmtree(work)
    durations["total"] = time.perf_counter() - start
    stats = {
        "complete": True, "fingerprint": expected, "model": cfg.clip_model,
        "model_identity": model_identity(cfg.clip_model), "embedding_dim": dim, "n_vectors": len(kept),
        "index_key": infos.get("index_key"), "index_param": infos.get("index_param"),
        "counts": counts, "durations_s": {k: round(v, 2) for k, v in durations.items()},
        "inputs": {"captions": str(cfg.captions), "toxic_snippets": str(cfg.toxic_snippets or "")},
    }
    (partial / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    shutil.rmtree(output_dir, ignore_errors=True)
    partial.rename(output_dir)
    return {**stats, "skipped": False}


def _check_embeddings(folder: Path, kept: list[corpus.Caption]) -> int:
    """Every caption came back exactly once (clip-retrieval skips what it cannot read); returns the
    dim. Reads only metadata and npy headers: a 1M-caption corpus is GBs of vectors."""
    ids: list[str] = []
    dims = set()
    for npy, parquet in embeddings.partition_files(folder, "text"):
        dims.add(np.load(npy, mmap_mode="r").shape[1])
        ids += map(str, pq.read_table(parquet, columns=["caption_id"]).column("caption_id").to_pylist())
    expected = {c.caption_id for c in kept}
    if len(ids) != len(expected) or set(ids) != expected or len(dims) != 1:
        raise embeddings.EmbeddingsError(
            f"{folder}: clip-retrieval embedded {len(ids)} captions for {len(expected)} inputs "
            f"({len(expected - set(ids))} missing, dims {sorted(dims)}); see the inference log")
    return int(dims.pop())


def _refuse_foreign_folder(output_dir: Path) -> None:
    """Never delete a folder that is not an index folder (a mistyped output_dir)."""
    if output_dir.is_dir() and any(output_dir.iterdir()):
        ours = set(INDEX_FILES) | {"metadata", "logs"}
        foreign = sorted(p.name for p in output_dir.iterdir() if p.name not in ours)
        if foreign:
            raise FileExistsError(f"{output_dir}: exists and holds {', '.join(foreign[:5])}, which an index folder "
                                  "does not; choose another output_dir or empty it")
