"""Retrieval quality and speed: the configured index (autofaiss, as caption_index builds it) vs exact search.

    PYTHONPATH=. .venv/bin/python bench/bench_retrieval.py [--vectors 200000] [--dim 512]
        [--config configs/caption_index.yaml] [key.sub=value ...]   (overrides of that config)

A synthetic clustered corpus (unit vectors around random centres, stored as float16 like
clip-retrieval's output) is indexed through `clip_env.build_index` in the retrieval environment,
with the config's `index` section; queries are fresh points of the same mixture. Printed, from
one run: recall@10 of the index (memory-mapped, autofaiss' tuned parameters, batched like the
join) against exact inner-product search, and queries/s of both. Goal: recall@10 ≥ 0.95.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.config import load_config  # noqa: E402
from pipeline.retrieval.clip_env import build_index, check_retrieval_python  # noqa: E402
from pipeline.retrieval.config import CaptionIndexConfig  # noqa: E402
from pipeline.retrieval.index import IndexInfo, open_index  # noqa: E402
from pipeline.retrieval.search import search  # noqa: E402

K = 10


def clustered(rng: np.random.Generator, n: int, dim: int, centres: np.ndarray, spread: float) -> np.ndarray:
    """Unit vectors: a random one of the unit-norm centres plus noise of norm ≈ spread, normalised."""
    points = centres[rng.integers(len(centres), size=n)] + rng.normal(0, spread / np.sqrt(dim), size=(n, dim))
    points = points.astype(np.float32)
    faiss.normalize_L2(points)
    return points


def recall_at_k(ids: np.ndarray, exact_ids: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / K for a, e in zip(ids, exact_ids)]))


def timed_search(fn, repeats: int = 2) -> tuple[np.ndarray, float]:
    best, ids = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        ids = fn()
        best = min(best, time.perf_counter() - start)
    return ids, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--topics", type=int, default=200)
    parser.add_argument("--clusters", type=int, default=20000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--spread", type=float, default=0.8, help="noise norm around each unit-norm centre")
    parser.add_argument("--config", default="configs/caption_index.yaml")
    args, overrides = parser.parse_known_args()
    # The corpus paths of the config do not matter here; only its index and environment settings.
    cfg = load_config(CaptionIndexConfig, args.config, [f"captions={args.config}", "toxic_snippets=null", *overrides])
    python = check_retrieval_python(cfg.retrieval_python)

    rng = np.random.default_rng(0)
    # Two levels, like captions: topics, clusters within a topic, points within a cluster.
    topics = rng.normal(size=(args.topics, args.dim)).astype(np.float32)
    faiss.normalize_L2(topics)
    centres = clustered(rng, args.clusters, args.dim, topics, args.spread)
    corpus = clustered(rng, args.vectors, args.dim, centres, args.spread).astype(np.float16)
    queries = clustered(rng, args.queries, args.dim, centres, args.spread)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "emb" / "text_emb").mkdir(parents=True)
        np.save(folder / "emb" / "text_emb" / "text_emb_0.npy", corpus)
        build_seconds = build_index(python, embeddings_dir=folder / "emb" / "text_emb", index_dir=folder / "index",
                                    cfg=cfg.index, log_path=folder / "index.log")
        infos = json.loads((folder / "index" / "text.json").read_text())
        info = IndexInfo(folder / "index", "bench", "bench", args.dim, args.vectors,
                         infos.get("index_key", ""), infos.get("index_param", ""))
        index = open_index(info)
        exact = faiss.IndexFlatIP(args.dim)
        exact.add(corpus.astype(np.float32))  # the same float16-rounded vectors the index holds

        approx_ids, approx_s = timed_search(lambda: search(index, queries, K, 4096)[1])
        exact_ids, exact_s = timed_search(lambda: search(exact, queries, K, 4096)[1])
        sweep = []
        if "nprobe" in info.index_param:  # the speed/recall trade-off of search.index_param
            for nprobe in (8, 16, 32, 64):
                index = open_index(info, f"nprobe={nprobe}")
                ids, seconds = timed_search(lambda index=index: search(index, queries, K, 4096)[1])
                sweep.append((nprobe, recall_at_k(ids, exact_ids), args.queries / seconds))
    recall = recall_at_k(approx_ids, exact_ids)
    print(f"corpus: {args.vectors} x {args.dim} (float16, {args.topics} topics x "
          f"{args.clusters // args.topics} clusters, "
          f"spread {args.spread}), "
          f"{args.queries} queries, "
          f"{faiss.omp_get_max_threads()} faiss threads")
    print(f"index: {info.index_key} [{info.index_param or 'no search parameters'}], built in {build_seconds:.0f} s "
          f"(max_index_memory={cfg.index.max_index_memory}, memory_mappable={cfg.index.memory_mappable})")
    print(f"recall@{K} vs exact         : {recall:.3f}  (goal >= 0.95)")
    print(f"queries/s index / exact     : {args.queries / approx_s:.0f} / {args.queries / exact_s:.0f} "
          f"= {exact_s / approx_s:.1f}x")
    for nprobe, sweep_recall, qps in sweep:
        print(f"  search.index_param=nprobe={nprobe:<3}: recall@{K} {sweep_recall:.3f}, {qps:.0f} queries/s "
              f"= {qps * exact_s / args.queries:.1f}x exact")


if __name__ == "__main__":
    main()
