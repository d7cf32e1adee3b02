"""retrieval_join: LLaVA JSON + images + caption index → WebDataset shards with retrieved text.

    python -m stages.retrieval_join --config configs/tiny/retrieval_join_stage1.yaml [key.sub=value ...]
    bash|sbatch launch/retrieval_join.sh [key.sub=value ...]     (a Slurm job array: one slice per task)

Each run handles one slice (slice.index of slice.count); the last slice to finish writes the
dataset's manifest.parquet, rejects.parquet and stats.json.
"""
from __future__ import annotations

import logging

from pipeline.config import parse_args
from pipeline.data.llava import LlavaInputError
from pipeline.process_exit import run_as_process
from pipeline.retrieval.clip_env import RetrievalEnvError
from pipeline.retrieval.config import RetrievalJoinConfig
from pipeline.retrieval.corpus import CorpusError
from pipeline.retrieval.embeddings import EmbeddingsError
from pipeline.retrieval.index import IndexFolderError
from pipeline.retrieval.join import run_retrieval_join


def summary(stats: dict, skipped: bool = False) -> str:
    counts = stats["counts"]
    rejected = ", ".join(f"{reason}={n}" for reason, n in counts["rejected"].items()) or "none"
    return (f"{counts['written']} samples written of {counts['input']} ({counts['with_image']} with image, "
            f"{counts['text_only']} text-only), rejected {sum(counts['rejected'].values())} ({rejected}), "
            f"{len(stats['shards'])} shards, {'written earlier in ' if skipped else ''}"
            f"{stats['durations_s']['total']:.1f} s")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(RetrievalJoinConfig, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        stats = run_retrieval_join(cfg)
    except (LlavaInputError, IndexFolderError, CorpusError, RetrievalEnvError, EmbeddingsError) as err:
        raise SystemExit(f"retrieval_join: {err}") from None
    done = " (already complete, nothing done)" if stats["skipped"] else ""
    print(f"retrieval_join slice {cfg.slice.index}/{cfg.slice.count}{done}: {summary(stats, stats['skipped'])}",
          flush=True)
    if stats["merged"] is not None:
        print(f"retrieval_join dataset {cfg.output_dir}: {summary(stats['merged'], stats['skipped'])}", flush=True)
    return stats


if __name__ == "__main__":
    run_as_process(main)
