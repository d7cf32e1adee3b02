"""Retrieved texts of eval images: the caption index queried exactly as for training.

Training reads `retrieved` from the shards that `stages.retrieval_join` writes (CLIP image
embedding -> faiss search of the caption index -> self/near-duplicate filter). The eval tools do
not search the index themselves: the eval JSON goes through the same join (its own config, output
folder), and its shards are read here, so eval images meet the index through the very code path
training images did. The prompt then takes `retrieved[0]["text"]`, as `pipeline.data.batch` does.

Accepted sources: a retrieval-join output folder (its `train-*.tar` shards), one shard `.tar`, or
a JSON/JSONL file of `{"id", "retrieved": [{"text", ...}]}` for texts retrieved some other way.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.data.shards import SHARD_PREFIX, ShardFormatError, iter_shard
from pipeline.eval.queries import EvalDataError, read_records


def read_retrieved(path: str | Path) -> dict[str, list[dict]]:
    """Record id (as a string) -> its retrieved hits, best first."""
    return {record_id: _hits(meta.get("retrieved"), source, record_id) for record_id, meta, source in _samples(path)}


def read_toxic_flags(path: str | Path) -> dict[str, bool]:
    """Record id -> whether its hits include a toxic corpus text (the join's `toxic` flag)."""
    return {record_id: bool(meta.get("toxic", False)) for record_id, meta, _ in _samples(path)}


def _samples(path: str | Path):
    """(record id, its json, the file it came from) of every sample of a join output, shard or JSON file."""
    path = Path(path)
    if path.is_dir():
        shards = sorted(path.glob(f"{SHARD_PREFIX}*.tar"))
        if not shards:
            raise EvalDataError(f"{path}: no {SHARD_PREFIX}*.tar shards; pass the output_dir of "
                                "`python -m stages.retrieval_join` run on the eval JSON")
    elif path.suffix == ".tar":
        shards = [path]
    elif path.suffix in (".json", ".jsonl"):
        yield from ((str(r["id"]), r, path) for r in read_records(path))
        return
    else:
        raise EvalDataError(f"{path}: not a retrieval-join folder, shard .tar or .json/.jsonl file")
    for shard in shards:
        try:
            for sample in iter_shard(shard):
                yield str(sample.meta.get("id", sample.key)), sample.meta, shard
        except ShardFormatError as err:
            raise EvalDataError(str(err)) from None


def top_text(hits: list[dict]) -> str | None:
    """The text the prompt shows: the top-1 hit (the reference uses top-1), None when none survived."""
    return hits[0]["text"] if hits else None


def missing_ids(path: str | Path, wanted: list[str], found: dict[str, list[dict]]) -> str:
    """A message for eval ids without retrieval, with the join's reject reasons where it has them."""
    missing = [i for i in wanted if i not in found]
    rejects_file = Path(path) / "rejects.parquet"
    reasons = {}
    if rejects_file.is_file():
        reasons = {str(r["key"]): r["reason"] for r in pq.read_table(rejects_file).to_pylist()}
    shown = ", ".join(f"{i} ({reasons[i]})" if i in reasons else i for i in missing[:10])
    more = f", … ({len(missing) - 10} more)" if len(missing) > 10 else ""
    return (f"{path}: no retrieved texts for {len(missing)} of {len(wanted)} eval samples: {shown}{more}; "
            "run the retrieval join on this eval file (see docs/evaluation.md)")


def _hits(value, source: Path, record_id) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(h, dict) and isinstance(h.get("text"), str)
                                              for h in value):
        raise EvalDataError(f"{source}: sample {record_id!r}: 'retrieved' must be a list of "
                            f"{{text, ...}} objects, got {json.dumps(value)[:120]}")
    return value
