"""Shard reading: samples/s of `iter_shard` (+ JPEG decode) vs a raw `tarfile` read + PIL decode,
from local files and from a loopback HTTP server.

    PYTHONPATH=. .venv/bin/python bench/bench_shard_read.py [--samples 2000] [--size 336] [--repeats 5]

Writes synthetic 336x336 JPEG samples with contract json through `ShardWriter`, then times, on
the same files in the same run: (ours) iter_shard (webdataset's gopen, tar expander and key
grouping) → PIL decode of the image, json already parsed; (raw) a tarfile member loop → PIL decode
of every .jpg, json bytes left unparsed. Locally raw opens the file; over HTTP (`python -m
http.server` in its own process on 127.0.0.1) raw streams the response with urllib while ours goes
through curl as training does. Goal: ours ≥ 0.8× raw for both.
"""
from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.data.shards import ShardWriter, iter_shard, shard_name  # noqa: E402


def synthetic_jpeg(rng: np.random.Generator, size: int) -> bytes:
    """Smooth gradients plus noise: compresses like a photo (tens of KB at 336 px), not like a flat fill."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, (x + y) / 2], axis=-1) * rng.uniform(80, 255, size=3)
    pixels = np.clip(base + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_shards(folder: Path, samples: int, size: int, per_shard: int) -> list[Path]:
    rng = np.random.default_rng(0)
    images = [synthetic_jpeg(rng, size) for _ in range(64)]  # reuse: decode cost is the same
    paths = []
    for start in range(0, samples, per_shard):
        path = folder / shard_name(start // per_shard)
        with ShardWriter(path) as shard:
            for i in range(start, min(start + per_shard, samples)):
                key = f"{i:09d}"
                shard.write(key, images[i % len(images)], {
                    "key": key, "source": "bench",
                    "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                      {"from": "gpt", "value": "A gradient with some noise " * 4}],
                    "image_caption": "a gradient", "toxic": False,
                    "retrieved": [{"text": f"retrieved caption {j}", "score": 0.5, "caption_id": f"c{j}"}
                                  for j in range(3)]})
        paths.append(path)
    return paths


def read_ours(paths: list[Path]) -> int:
    count = 0
    for path in paths:
        for sample in iter_shard(path):
            Image.open(io.BytesIO(sample.image)).convert("RGB")
            count += len(sample.meta["conversations"]) > 0
    return count


def read_raw(paths: list) -> int:
    count = 0
    for path in paths:
        stream = urllib.request.urlopen(path) if str(path).startswith("http") else open(path, "rb")
        with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                if member.name.endswith(".jpg"):
                    Image.open(io.BytesIO(data)).convert("RGB")
                    count += 1
    return count


def http_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """`python -m http.server` on a free loopback port, in its own process (not our GIL)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise SystemExit("the loopback HTTP server did not start")
            time.sleep(0.1)


def best_rates(readers: dict, paths: list[Path], repeats: int) -> dict[str, float]:
    """Best samples/s of each reader; readers alternate within every repeat, so a load change on a
    shared machine hits both alike."""
    best = {name: float("inf") for name in readers}
    for _ in range(repeats):
        for name, fn in readers.items():
            start = time.perf_counter()
            n = fn(paths)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: n / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--size", type=int, default=336)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    readers = {"raw": read_raw, "ours": read_ours}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(Path(tmp), args.samples, args.size, args.per_shard)
        read_raw(paths[:1])  # warm the page cache for both readers
        local = best_rates(readers, paths, args.repeats)
        server, base = http_server(Path(tmp))
        try:
            remote = best_rates(readers, [f"{base}/{p.name}" for p in paths], args.repeats)
        finally:
            server.kill()
            server.wait()
        mb = sum(p.stat().st_size for p in paths) / 1e6
    print(f"shards: {len(paths)} x {args.per_shard} samples, {args.size}px JPEG, {mb:.0f} MB")
    for where, rates in (("local files", local), ("loopback HTTP", remote)):
        print(f"{where}:")
        print(f"  raw tarfile + PIL decode : {rates['raw']:8.0f} samples/s")
        print(f"  iter_shard + PIL decode  : {rates['ours']:8.0f} samples/s (json parsed too)")
        print(f"  ratio ours / raw         : {rates['ours'] / rates['raw']:.2f}  (goal >= 0.80)")


if __name__ == "__main__":
    main()
