"""caption_index: caption corpus (+ toxic snippets) → CLIP text embeddings → faiss index folder.

    python -m stages.caption_index --config configs/tiny/caption_index.yaml [key.sub=value ...]
    bash|sbatch launch/caption_index.sh [key.sub=value ...]

Re-running on unchanged inputs does nothing; a half-written or outdated index is rebuilt.
"""
from __future__ import annotations

import logging

from pipeline.config import parse_args
from pipeline.process_exit import run_as_process
from pipeline.retrieval.build import run_caption_index
from pipeline.retrieval.clip_env import RetrievalEnvError
from pipeline.retrieval.config import CaptionIndexConfig
from pipeline.retrieval.corpus import CorpusError
from pipeline.retrieval.embeddings import EmbeddingsError


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(CaptionIndexConfig, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        stats = run_caption_index(cfg)
    except (CorpusError, RetrievalEnvError, EmbeddingsError, FileExistsError) as err:
        raise SystemExit(f"caption_index: {err}") from None
    counts = stats["counts"]
    print(f"caption_index: {'up to date, nothing done' if stats['skipped'] else 'built'}: {stats['n_vectors']} "
          f"captions ({counts['toxic']} toxic; dropped {counts['empty_text']} empty, {counts['duplicate_text']} "
          f"duplicate) of dim {stats['embedding_dim']}, index {stats['index_key']} in {cfg.output_dir}, "
          f"{'built earlier in ' if stats['skipped'] else ''}{stats['durations_s']['total']:.1f} s", flush=True)
    return stats


if __name__ == "__main__":
    run_as_process(main)
