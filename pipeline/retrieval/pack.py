"""retrieval_join step a: validated LLaVA samples → staging tars of checked JPEG images.

Each image is read and fully decoded once (a truncated JPEG only fails when decoded); JPEG bytes
are kept as they are, anything else (PNG, also PNG files named .jpg) is re-encoded as JPEG.
Staging tar n holds the image samples of one output shard, `<key>.jpg` + `<key>.json` =
{"key": key}: exactly what `clip-retrieval inference` needs to embed them and name each row.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import logging
from pathlib import Path
from typing import Iterator

from PIL import Image

from pipeline.conventions import Reject
from pipeline.data.llava import LlavaSample
from pipeline.data.shards import ShardWriter, iter_shard
from pipeline.progress import progress as progress_bar

log = logging.getLogger(__name__)
# Images above this many pixels are refused by PIL as decompression bombs; LLaVA's largest are far below.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """The samples of one output shard (in input order) and, if any has an image, its staging tar."""
    index: int
    samples: list[LlavaSample]
    staging: Path | None


def load_image(path: Path, jpeg_quality: int) -> tuple[bytes | None, str, str]:
    """(JPEG bytes, "", "") or (None, reason, detail) with reason missing_image | unreadable_image."""
    if not path.is_file():
        return None, "missing_image", f"{path} does not exist"
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format == "JPEG":
                return data, "", ""
            out = io.BytesIO()
            image.convert("RGB").save(out, format="JPEG", quality=jpeg_quality)
            return out.getvalue(), "", ""
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return None, "unreadable_image", f"{path}: {type(err).__name__}: {err}"


def _load(job: tuple[Path, int]) -> tuple[bytes | None, str, str]:
    return load_image(*job)


def pack_shards(shards: list[tuple[int, list[LlavaSample | Reject]]], image_root: Path, staging_dir: Path,
                jpeg_quality: int, workers: int) -> tuple[list[ShardPlan], list[Reject]]:
    """Check every image of every shard and write the staging tars (`images-000000.tar`, … in shard
    order, numbered consecutively so clip-retrieval can read them as one brace pattern).
    Returns the plans of all shards and the rejects (record rejects and image rejects, input order)."""
    staging_dir.mkdir(parents=True, exist_ok=True)
    plans, rejects = [], []
    total = sum(len(items) for _, items in shards)
    pool_context = concurrent.futures.ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext()
    with pool_context as pool, progress_bar(total, desc="pack") as progress:
        for shard_index, items in shards:
            samples = [item for item in items if isinstance(item, LlavaSample)]
            jobs = [(image_root / s.image, jpeg_quality) for s in samples if s.image is not None]
            loaded = iter(pool.map(_load, jobs, chunksize=16) if pool else map(_load, jobs))
            kept: list[LlavaSample] = []
            staging = staging_dir / f"images-{sum(p.staging is not None for p in plans):06d}.tar"
            writer = None
            for item in items:
                progress.update(1)
                if isinstance(item, Reject):
                    rejects.append(item)
                    continue
                if item.image is None:
                    kept.append(item)
                    continue
                data, reason, detail = next(loaded)
                if data is None:
                    rejects.append(Reject(reason, detail, key=item.key, position=item.position))
                    continue
                writer = writer or ShardWriter(staging)
                writer.write(item.key, data, {"key": item.key})
                kept.append(item)
            if writer is not None:
                writer.close()
            plans.append(ShardPlan(shard_index, kept, staging if writer is not None else None))
    return plans, rejects


def iter_staged_images(plan: ShardPlan) -> Iterator[tuple[str, bytes]]:
    """(key, jpeg) of a plan's staging tar, in the order they were written."""
    if plan.staging is not None:
        for sample in iter_shard(plan.staging):
            yield sample.key, sample.image
