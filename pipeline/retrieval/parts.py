"""Per-slice results of retrieval_join and their merge into the dataset's manifest/rejects/stats.

A Slurm array runs slices in any order and at once; each writes `parts/<slice>/` (stats.json
last). Any slice that finds every part of the same run (same fingerprint) merges them; merging is
idempotent, so two slices finishing together write the same files.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline.data.shards import (SHARD_PREFIX, read_table_rows, write_manifest, write_rejects, write_stats)

log = logging.getLogger(__name__)


def slice_name(index: int, count: int) -> str:
    return f"slice-{index:05d}-of-{count:05d}"


def part_dir(output_dir: Path, name: str) -> Path:
    return Path(output_dir) / "parts" / name


def read_part_stats(output_dir: Path, name: str) -> dict[str, Any]:
    path = part_dir(output_dir, name) / "stats.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def merge_if_complete(output_dir: Path, count: int, fingerprint: str) -> dict[str, Any] | None:
    """Merge all `count` parts into the top-level files when they are all done; else None."""
    output_dir = Path(output_dir)
    names = [slice_name(i, count) for i in range(count)]
    stats = [read_part_stats(output_dir, name) for name in names]
    waiting = [name for name, s in zip(names, stats) if s.get("fingerprint") != fingerprint]
    if waiting:
        log.info("%d of %d slices done; the last one to finish writes manifest.parquet", count - len(waiting), count)
        return None
    manifest, rejects = [], []
    for name in names:
        manifest += read_table_rows(part_dir(output_dir, name) / "manifest.parquet")
        rejects += read_table_rows(part_dir(output_dir, name) / "rejects.parquet")
    merged = merge_stats(stats)
    _remove_stale(output_dir, set(merged["shards"]), set(names))
    write_manifest(output_dir / "manifest.parquet", manifest)
    write_rejects(output_dir / "rejects.parquet", rejects)
    write_stats(output_dir / "stats.json", merged)
    return merged


def merge_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the counts and durations of the slices; shards in order. Checks written + rejected == input."""
    counts: dict[str, Any] = {"rejected": {}}
    durations: dict[str, float] = {}
    for part in stats:
        for name, value in part["counts"].items():
            if name == "rejected":
                for reason, n in value.items():
                    counts["rejected"][reason] = counts["rejected"].get(reason, 0) + n
            else:
                counts[name] = counts.get(name, 0) + value
        for phase, seconds in part["durations_s"].items():
            durations[phase] = round(durations.get(phase, 0.0) + seconds, 2)
    counts["rejected"] = dict(sorted(counts["rejected"].items()))
    if counts["written"] + sum(counts["rejected"].values()) != counts["input"]:
        raise AssertionError(f"merged counts {counts} do not add up; a part is inconsistent")
    shards = [name for part in stats for name in part["shards"]]
    first = stats[0]
    return {"fingerprint": first["fingerprint"], "counts": counts, "shards": shards, "n_shards": len(shards),
            "slices": len(stats), "durations_s": durations,
            "max_slice_seconds": max(part["durations_s"].get("total", 0.0) for part in stats),
            **{key: first[key] for key in ("source", "input", "index", "model", "k", "image_caption")}}


def _remove_stale(output_dir: Path, shards: set[str], names: set[str]) -> None:
    """Shards and parts an earlier run (other shard size or slice count) left behind would be read
    by the training loader; the merged manifest is the truth. Two slices may merge at once, so
    everything here tolerates files vanishing under it."""
    for path in output_dir.glob(f"{SHARD_PREFIX}*.tar"):
        if path.name not in shards:
            log.info("removing %s: not part of this dataset (left by an earlier run)", path.name)
            path.unlink(missing_ok=True)
    for path in (output_dir / "parts").iterdir():
        if path.name not in names:
            shutil.rmtree(path, ignore_errors=True)
    work = output_dir / "_work"
    if work.is_dir() and not any(work.iterdir()):
        shutil.rmtree(work, ignore_errors=True)
