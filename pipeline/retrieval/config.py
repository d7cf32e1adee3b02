"""Configs of the two retrieval stages (`caption_index`, `retrieval_join`); YAML in configs/.

Paths are relative to the repo root. `retrieval_python` is the interpreter of the separate
retrieval environment (clip-retrieval pins numpy<2, transformers<5, ...): `make retrieval-env`
links it as `.retrieval-venv`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from pipeline.config import InputPath

DEFAULT_RETRIEVAL_PYTHON = Path(".retrieval-venv/bin/python")


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """`clip-retrieval inference` options."""
    batch_size: int = 256
    num_prepro_workers: int = 4      # data-loader processes decoding images/tokenizing text
    # Rows per output partition (its `write_batch_size`); each partition reloads the model, so
    # keep one partition per job unless a single .npy would not fit in memory.
    rows_per_partition: int = 1_000_000

    def __post_init__(self):
        if self.batch_size < 1 or self.num_prepro_workers < 0 or self.rows_per_partition < 1:
            raise ValueError("inference: batch_size and rows_per_partition must be ≥ 1, num_prepro_workers ≥ 0")


@dataclasses.dataclass(frozen=True)
class IndexBuildConfig:
    """autofaiss `build_index` options (what `clip-retrieval index` calls, plus the index type)."""
    index_key: str | None = None     # faiss factory string; None = autofaiss picks; "Flat" = exact search
    memory_mappable: bool = True     # only index types faiss can memory-map (IVF*, Flat): search RAM stays small
    max_index_memory: str = "4G"     # size budget of the index itself
    current_memory: str = "16G"      # RAM the build may use (training the IVF quantizer)
    nb_cores: int | None = None      # None = all cores


@dataclasses.dataclass(frozen=True)
class CaptionIndexConfig:
    captions: InputPath                       # parquet or jsonl: caption_id, text, [source], [toxic]
    clip_model: str                           # "hf_clip:/path/to/clip-folder" or "open_clip:ARCH/PRETRAINED"
    output_dir: Path = Path("work/index")
    toxic_snippets: InputPath | None = None   # jsonl/parquet (text, [caption_id]) or .txt (one per line)
    retrieval_python: Path = DEFAULT_RETRIEVAL_PYTHON
    captions_per_tar: int = 100_000           # clip-retrieval input tars of the corpus
    inference: InferenceConfig = dataclasses.field(default_factory=InferenceConfig)
    index: IndexBuildConfig = dataclasses.field(default_factory=IndexBuildConfig)

    def __post_init__(self):
        if self.captions_per_tar < 1:
            raise ValueError("captions_per_tar must be ≥ 1")


@dataclasses.dataclass(frozen=True)
class SliceConfig:
    """Which part of the input this job owns (a Slurm array task: index = task id, count = tasks)."""
    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"slice: need 0 ≤ index < count, got index={self.index} count={self.count}")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    k: int = 3                           # retrieved texts kept per image (the reference prompts with top-1)
    candidates: int = 32                 # hits fetched from faiss before dropping self/near duplicates
    # Hits whose word-set Jaccard similarity with the ground-truth caption is ≥ this are near
    # duplicates ("a dog on the beach" vs "a dog on a beach" = 0.8) and are never retrieved.
    near_duplicate_jaccard: float = 0.8
    batch_size: int = 4096               # queries per faiss call
    # Search-time parameters in faiss ParameterSpace syntax ("nprobe=32"); None = what autofaiss
    # tuned at build time (text.json). Lower nprobe: faster, lower recall (bench/bench_retrieval.py).
    index_param: str | None = None

    def __post_init__(self):
        if self.k < 1 or self.candidates < self.k + 1:
            raise ValueError(f"search: need k ≥ 1 and candidates > k, got k={self.k} candidates={self.candidates}")
        if not 0.0 < self.near_duplicate_jaccard <= 1.0:
            raise ValueError("search.near_duplicate_jaccard must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class TrainingReadersConfig:
    """The data readers the training stage will use: only to warn when there are fewer shards."""
    world_size: int = 1
    loader_workers: int = 1


@dataclasses.dataclass(frozen=True)
class RetrievalJoinConfig:
    input: InputPath                          # LLaVA JSON/JSONL (blip_laion_cc_sbu_558k.json, llava_v1_5_mix665k.json)
    image_root: InputPath                     # the "image" fields are relative to this folder
    index_dir: InputPath                      # output of caption_index
    clip_model: str                           # must be the model that built the index
    output_dir: Path = Path("work/shards")
    source: str | None = None                 # the samples' "source"; None = input file stem
    # image_caption of each sample: "answer" = the first gpt turn (LCS-558K, where it is the
    # caption); "caption_map" = look the image up in `caption_map` (image, caption), best
    # retrieved caption when absent; "retrieved" = the best retrieved caption; "none" = no caption
    # at all (evaluation images without one, e.g. benchmarks: the top-k hits are kept as found).
    image_caption: Literal["answer", "caption_map", "retrieved", "none"] = "answer"
    caption_map: InputPath | None = None
    duplicate_ids: Literal["reject", "suffix"] = "reject"
    samples_per_shard: int = 1000             # input records per shard; rejects make a shard smaller
    jpeg_quality: int = 95                    # only for images that are not JPEG already
    pack_workers: int = 1                     # processes reading/checking images
    keep_intermediate: bool = False           # keep staging tars and image embeddings for inspection
    retrieval_python: Path = DEFAULT_RETRIEVAL_PYTHON
    slice: SliceConfig = dataclasses.field(default_factory=SliceConfig)
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)
    inference: InferenceConfig = dataclasses.field(default_factory=InferenceConfig)
    training: TrainingReadersConfig = dataclasses.field(default_factory=TrainingReadersConfig)

    def __post_init__(self):
        if self.samples_per_shard < 1 or self.pack_workers < 1:
            raise ValueError("samples_per_shard and pack_workers must be ≥ 1")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if (self.image_caption == "caption_map") != (self.caption_map is not None):
            raise ValueError("image_caption: caption_map needs a caption_map file, and a caption_map file "
                             f"needs image_caption: caption_map (got image_caption={self.image_caption!r}, "
                             f"caption_map={self.caption_map})")
