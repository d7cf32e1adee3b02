"""retrieval_join: LLaVA records + images + caption index → training shards with retrieved text.

    a. pack    records → staging tars of checked JPEGs                          (pack.py, main env)
    b. embed   staging tars → CLIP image embeddings via clip-retrieval           (clip_env.py, retrieval env)
    c. search  faiss top-k in the index, drop self/near duplicates, write shards (search.py, main env)

Shard n holds the valid records among input positions [n·S, (n+1)·S) (S = samples_per_shard),
so shard names and contents depend on the input alone, never on how many jobs run: slice i of
c owns shards [⌊i·N/c⌋, ⌊(i+1)·N/c⌋). Each slice writes its shards plus
`parts/slice-i-of-c/{manifest,rejects}.parquet, stats.json`; whichever slice finds all parts
present merges them into manifest.parquet, rejects.parquet and stats.json.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import to_dict
from pipeline.conventions import Reject
from pipeline.data import llava
from pipeline.data.shards import (ShardWriter, check_shard_count, shard_name, write_manifest, write_rejects,
                                  write_stats)
from pipeline.progress import progress as progress_bar

from . import clip_env, corpus, embeddings, pack, parts, search
from .config import RetrievalJoinConfig
from .index import (CaptionTable, IndexInfo, check_dim, check_model, load_caption_table, open_index, projection_dim,
                    read_index_info)

log = logging.getLogger(__name__)


def slice_shards(n_records: int, samples_per_shard: int, index: int, count: int) -> range:
    n_shards = math.ceil(n_records / samples_per_shard)
    return range(index * n_shards // count, (index + 1) * n_shards // count)


@dataclasses.dataclass(frozen=True)
class _Inputs:
    python: Path
    info: IndexInfo
    caption_map: dict[str, str] | None
    records: list[llava.RawRecord]


def check_inputs(cfg: RetrievalJoinConfig) -> _Inputs:
    """Every whole-input problem, raised before any work: environment, index, model, files."""
    python = clip_env.check_retrieval_python(cfg.retrieval_python)
    info = read_index_info(cfg.index_dir)
    check_model(info, cfg.clip_model)
    declared_dim = projection_dim(cfg.clip_model)
    if declared_dim is not None:
        check_dim(info, declared_dim, f"{cfg.clip_model!r} (projection_dim in its config.json)")
    caption_map = corpus.read_caption_map(cfg.caption_map) if cfg.caption_map is not None else None
    records = llava.read_records(cfg.input)
    if not records:
        raise llava.LlavaInputError(f"{cfg.input}: no records")
    return _Inputs(python, info, caption_map, records)


def _embed(cfg: RetrievalJoinConfig, inputs: _Inputs, staging: list[Path], work: Path, log_path: Path,
           durations: dict[str, float]) -> tuple[dict[str, int], np.ndarray]:
    """Image embeddings of the staged tars through clip-retrieval: (key → row, [N, D] vectors).
    A slice of text-only chats has nothing to embed."""
    if not staging:
        return {}, np.zeros((0, inputs.info.embedding_dim), np.float32)
    durations["embed"] = clip_env.run_inference(
        inputs.python, tars=staging, output_dir=work / "embeddings", modality="image",
        clip_model=cfg.clip_model, samples_per_tar=cfg.samples_per_shard, cfg=cfg.inference, log_path=log_path)
    vectors, table = embeddings.read_embeddings(work / "embeddings", "img")
    check_dim(inputs.info, int(vectors.shape[1]), f"image embeddings of {cfg.clip_model!r}")
    return {key: row for row, key in enumerate(table.column("key").to_pylist())}, vectors


def _write_shards(writer: _SampleWriter, plans: list, output_dir: Path, rejects: list) -> tuple[list, list[str]]:
    """Every planned shard through the writer: (manifest rows, names of the shards written);
    the writer's rejects are appended to `rejects`."""
    manifest, shard_names = [], []
    with progress_bar(sum(len(p.samples) for p in plans), desc="write") as progress:
        for plan in plans:
            rows, shard_rejects = writer.write_shard(plan, output_dir, progress)
            manifest += rows
            rejects += shard_rejects
            if rows:
                shard_names.append(shard_name(plan.index))
    return manifest, shard_names


def _write_part(part: Path, manifest: list, rejects: list, stats: dict[str, Any]) -> None:
    write_manifest(part / "manifest.parquet", manifest)
    write_rejects(part / "rejects.parquet", [{"key": r.key, "reason": r.reason, "detail": r.detail} for r in rejects])
    write_stats(part / "stats.json", stats)  # last: marks the slice complete


def run_retrieval_join(cfg: RetrievalJoinConfig) -> dict[str, Any]:
    """Run this config's slice (skipped when already done); returns its stats, plus "merged" (the
    dataset's stats) when this call completed the dataset."""
    start = time.perf_counter()
    inputs = check_inputs(cfg)
    output_dir = Path(cfg.output_dir)
    fingerprint = _fingerprint(cfg, inputs.info)
    slice_name = parts.slice_name(cfg.slice.index, cfg.slice.count)
    done = parts.read_part_stats(output_dir, slice_name)
    if done.get("fingerprint") == fingerprint:
        log.info("%s of %s is already complete: nothing to do", slice_name, output_dir)
        return {**done, "skipped": True, "merged": _merge(cfg, fingerprint)}

    samples = llava.validate_records(inputs.records, cfg.duplicate_ids)
    per_shard = cfg.samples_per_shard
    shard_range = slice_shards(len(samples), per_shard, cfg.slice.index, cfg.slice.count)
    shards = [(n, samples[n * per_shard : (n + 1) * per_shard]) for n in shard_range]
    n_input = sum(len(items) for _, items in shards)
    log.info("%s: %d of %d records, shards %s", slice_name, n_input, len(samples), _range_text(shard_range))
    work = output_dir / "_work" / slice_name
    shutil.rmtree(work, ignore_errors=True)
    durations = {}

    mark = time.perf_counter()  # a. pack
    plans, rejects = pack.pack_shards(shards, Path(cfg.image_root), work / "staging", cfg.jpeg_quality,
                                      cfg.pack_workers)
    durations["pack"] = time.perf_counter() - mark
    staging = [plan.staging for plan in plans if plan.staging is not None]
    key_rows, vectors = _embed(cfg, inputs, staging, work, output_dir / "logs" / f"{slice_name}-inference.log",
                               durations)  # b. embed

    mark = time.perf_counter()  # c. search, then write
    captions = load_caption_table(inputs.info)
    scores, ids = None, None
    if len(vectors):
        index = open_index(inputs.info, cfg.search.index_param)
        scores, ids = search.search(index, vectors, cfg.search.candidates, cfg.search.batch_size)
    durations["search"] = time.perf_counter() - mark
    mark = time.perf_counter()
    source = cfg.source or Path(cfg.input).stem
    writer = _SampleWriter(cfg, captions, inputs.caption_map, source, key_rows, scores, ids)
    manifest, shard_names = _write_shards(writer, plans, output_dir, rejects)
    durations["write"] = time.perf_counter() - mark

    rejects.sort(key=lambda r: r.position)
    counts = {"input": n_input, "written": len(manifest), "rejected": _by_reason(rejects), **writer.counts}
    if counts["written"] + sum(counts["rejected"].values()) != n_input:
        raise AssertionError(f"{slice_name}: {counts} do not add up to the input; this is a bug, please report it")
    durations["total"] = time.perf_counter() - start
    stats = {
        "fingerprint": fingerprint, "slice": {"index": cfg.slice.index, "count": cfg.slice.count,
                                              "shards": [shard_range.start, shard_range.stop]},
        "counts": counts, "shards": shard_names, "durations_s": {k: round(v, 2) for k, v in durations.items()},
        "source": source, "input": str(cfg.input), "index": str(cfg.index_dir), "model": cfg.clip_model,
        "k": cfg.search.k, "image_caption": cfg.image_caption,
    }
    _write_part(parts.part_dir(output_dir, slice_name), manifest, rejects, stats)
    if not cfg.keep_intermediate:
        shutil.rmtree(work, ignore_errors=True)
    return {**stats, "skipped": False, "merged": _merge(cfg, fingerprint)}


def _merge(cfg: RetrievalJoinConfig, fingerprint: str) -> dict[str, Any] | None:
    merged = parts.merge_if_complete(Path(cfg.output_dir), cfg.slice.count, fingerprint)
    if merged is not None:
        warning = check_shard_count(merged["n_shards"], cfg.training.world_size, cfg.training.loader_workers)
        merged["shard_count_warning"] = warning
    return merged


class _SampleWriter:
    """Step c for one shard at a time: the final json of each sample and the shard/manifest rows."""

    def __init__(self, cfg: RetrievalJoinConfig, captions: CaptionTable, caption_map: dict[str, str] | None,
                 source: str, key_rows: dict[str, int], scores: np.ndarray, ids: np.ndarray):
        self.cfg, self.captions, self.caption_map, self.source = cfg, captions, caption_map, source
        self.key_rows, self.scores, self.ids = key_rows, scores, ids
        self.counts = {"with_image": 0, "text_only": 0, "caption_from_retrieval": 0, "short_retrieval": 0,
                       "dropped_self_or_near_duplicate": 0, "toxic_samples": 0}

    def write_shard(self, plan: pack.ShardPlan, output_dir: Path, progress) -> tuple[list[dict], list[Reject]]:
        rows, rejects, samples = [], [], []
        images = pack.iter_staged_images(plan)
        for sample in plan.samples:
            progress.update(1)
            image = None
            if sample.image is not None:
                key, image = next(images)
                assert key == sample.key, f"staging order broken at {key} != {sample.key}"
                if sample.key not in self.key_rows:
                    rejects.append(Reject("no_embedding", "clip-retrieval returned no embedding (see the inference "
                                          "log)", key=sample.key, position=sample.position))
                    continue
            samples.append((sample, image))
        if not samples:
            return rows, rejects
        with ShardWriter(output_dir / shard_name(plan.index)) as shard:
            for sample, image in samples:
                meta = self.sample_json(sample)
                offset = shard.write(sample.key, image, meta)
                first = meta["retrieved"][0]["text"] if meta["retrieved"] else ""
                rows.append({"key": sample.key, "shard": shard_name(plan.index), "offset": offset,
                             "n_tokens": llava.estimate_tokens(sample.conversations, first),
                             "has_image": image is not None, "source": self.source})
        return rows, rejects

    def sample_json(self, sample: llava.LlavaSample) -> dict:
        """The shard contract's json for one sample (text-only: no caption, nothing retrieved)."""
        caption, hits = "", []
        if sample.image is None:
            self.counts["text_only"] += 1
        else:
            self.counts["with_image"] += 1
            truth = self.ground_truth(sample)
            row = self.key_rows[sample.key]
            caption, hits, dropped = search.retrieve(
                self.ids[row], self.scores[row], self.captions, ground_truth=truth,
                own_caption_ids=frozenset({sample.id, sample.key}), k=self.cfg.search.k,
                near_duplicate_jaccard=self.cfg.search.near_duplicate_jaccard,
                caption_from_retrieval=self.cfg.image_caption != "none")
            self.counts["dropped_self_or_near_duplicate"] += dropped
            self.counts["caption_from_retrieval"] += truth is None and self.cfg.image_caption != "none"
            self.counts["short_retrieval"] += len(hits) < self.cfg.search.k
            self.counts["toxic_samples"] += any(hit.toxic for hit in hits)
        return {"key": sample.key, "id": sample.id, "source": self.source, "image": sample.image,
                "conversations": sample.conversations, "image_caption": caption or "",
                "retrieved": [hit.as_json() for hit in hits], "toxic": any(hit.toxic for hit in hits)}

    def ground_truth(self, sample: llava.LlavaSample) -> str | None:
        if self.cfg.image_caption == "answer":
            return llava.first_answer(sample.conversations)
        if self.cfg.image_caption == "caption_map":
            return self.caption_map.get(sample.image)
        return None


def _fingerprint(cfg: RetrievalJoinConfig, info: IndexInfo) -> str:
    """What determines a slice's output: input bytes, the index, and the settings that change samples."""
    digest = hashlib.sha256()
    corpus.hash_files(digest, (cfg.input, cfg.caption_map))
    index_stats = json.loads((Path(info.folder) / "stats.json").read_text())
    digest.update(str(index_stats.get("fingerprint")).encode())
    settings = {k: v for k, v in to_dict(cfg).items()
                if k not in ("slice", "pack_workers", "keep_intermediate", "training", "inference", "retrieval_python")}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def _by_reason(rejects: list[Reject]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reject in rejects:
        counts[reject.reason] = counts.get(reject.reason, 0) + 1
    return dict(sorted(counts.items()))


def _range_text(shards: range) -> str:
    return f"{shards.start}..{shards.stop - 1}" if len(shards) else "(none)"
