"""Top-k caption retrieval for image embeddings, minus the image's own caption and its near duplicates.

TGA puts the retrieved text in the prompt and pulls the image toward its caption; if the
retrieved text *were* the caption (stage-1 data: the caption is the answer), the model could copy
it. The reference halves a top-1 that equals the caption; here every hit that is the sample's own
corpus entry (same caption id) or a near duplicate of the ground truth (word-set Jaccard ≥
threshold, after lower-casing and keeping only letters/digits) is skipped and the next hit taken.

`retrieve` is pure: arrays of hit ids/scores and texts in, kept hits out.
"""
from __future__ import annotations

import dataclasses
import re

import faiss
import numpy as np

from .index import CaptionTable

_WORD = re.compile(r"[^\W_]+")


@dataclasses.dataclass(frozen=True)
class Hit:
    text: str
    score: float
    caption_id: str
    toxic: bool

    def as_json(self) -> dict:
        return {"text": self.text, "score": round(self.score, 6), "caption_id": self.caption_id}


def search(index: faiss.Index, queries: np.ndarray, candidates: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), both (n, candidates), best first; id -1 where the index has fewer hits.
    Queries are L2-normalised here, so scores are cosine similarities."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    faiss.normalize_L2(queries)
    scores = np.empty((len(queries), candidates), np.float32)
    ids = np.empty((len(queries), candidates), np.int64)
    for start in range(0, len(queries), batch_size):
        batch = queries[start : start + batch_size]
        scores[start : start + len(batch)], ids[start : start + len(batch)] = index.search(batch, candidates)
    return scores, ids


def words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def retrieve(ids: np.ndarray, scores: np.ndarray, table: CaptionTable, *, ground_truth: str | None,
             own_caption_ids: frozenset[str], k: int, near_duplicate_jaccard: float,
             caption_from_retrieval: bool = True) -> tuple[str | None, list[Hit], int]:
    """For one image: (ground truth, up to k hits best first, number of hits dropped as self/near duplicate).

    Hits are dropped when they are the sample's own caption (`own_caption_ids`) or a near
    duplicate of the ground truth. Without a ground truth (`None`), the best remaining hit becomes
    it and is returned as the first element; the k hits then exclude its near duplicates too.
    `caption_from_retrieval=False` (unlabelled eval images) keeps the None: nothing is taken as the
    caption, and the k hits are the best ones as found.
    """
    truth_words = words(ground_truth) if ground_truth is not None else None
    kept: list[Hit] = []
    dropped = 0
    for row, score in zip(ids.tolist(), scores.tolist()):
        if row < 0:
            break
        caption_id = table.caption_ids[row]
        text = table.texts[row]
        if caption_id in own_caption_ids or (
                truth_words is not None and jaccard(words(text), truth_words) >= near_duplicate_jaccard):
            dropped += 1
            continue
        if ground_truth is None and caption_from_retrieval:
            ground_truth, truth_words = text, words(text)
            continue
        kept.append(Hit(text, float(score), caption_id, bool(table.toxic[row])))
        if len(kept) == k:
            break
    return ground_truth, kept, dropped
