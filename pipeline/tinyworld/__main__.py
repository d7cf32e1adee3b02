"""`python -m pipeline.tinyworld --out DIR [--seed 0] [--force]`: the tiny world in DIR.

A complete world of this seed made by this generator is kept as it is (one line says so). Anything
else in DIR (another seed, other generator code, files changed since) is rebuilt only with
`--force`. A build never pulls files from under a job that reads DIR: it writes a temporary folder
beside DIR and swaps it in with one rename when complete, and a lock keeps two builds apart.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from pipeline.process_exit import run_as_process

from .world import WorldPaths, generate, stale_reason

_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two paths atomically
_AT_FDCWD = -100


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tinyworld",
                                     description="Generate the tiny world (deterministic, offline).")
    parser.add_argument("--out", type=Path, required=True, help="the world's folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true",
                        help="rebuild a world that is kept otherwise (complete, or of another seed or generator)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    with _lock(out):
        if not _needs_build(out, args.seed, args.force):
            return
        start = time.perf_counter()
        print(f"tinyworld: building {out} (seed {args.seed}; a few minutes on 2 cores)", flush=True)
        try:
            _build_beside(out, args.seed)
        except FileNotFoundError as err:  # e.g. the CLIP vocabulary file of clip-anytorch
            raise SystemExit(f"tinyworld: {err}") from None
    world = json.loads(WorldPaths.under(out).world_json.read_text())
    print(json.dumps({"out": str(out), "seconds": round(time.perf_counter() - start, 1),
                      "counts": world["counts"], "metrics": world["metrics"]}, indent=2), flush=True)


def _needs_build(out: Path, seed: int, force: bool) -> bool:
    """Whether to build `out`: yes when it is missing, empty or half-written; a complete world is
    kept and a stale one refused, unless `force`. A folder that holds no world is never replaced."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"tinyworld: {out}: exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return True
    reason = stale_reason(WorldPaths.under(out), seed)
    if reason is None and not force:
        print(f"tinyworld: {out} holds a complete world of seed {seed} made by this generator: kept "
              "(--force rebuilds it)", flush=True)
        return False
    if reason is not None and reason.startswith("holds no tiny world"):
        raise SystemExit(f"tinyworld: {out}: {reason}; choose an empty or new folder")
    if reason is not None and not reason.startswith("incomplete") and not force:
        raise SystemExit(f"tinyworld: {out}: {reason}; rerun with --force to rebuild it (once no job reads it)")
    return True


def _build_beside(out: Path, seed: int) -> None:
    """Generate into a sibling folder, then put it in place of `out` in one step: a job reading the
    old world keeps its open files, and every path names a complete world at every moment."""
    building = out.parent / f".{out.name}.building"
    shutil.rmtree(building, ignore_errors=True)  # left by a build that was killed
    generate(building, seed)
    if out.exists():
        _exchange(building, out)  # `building` now holds the old world
        shutil.rmtree(building)
    else:
        os.rename(building, out)


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders atomically (Linux renameat2); elsewhere, two renames in a row."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None and renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                                           _RENAME_EXCHANGE) == 0:
        return
    parked = b.parent / f".{b.name}.old"
    shutil.rmtree(parked, ignore_errors=True)
    os.rename(b, parked)
    os.rename(a, b)
    os.rename(parked, a)


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """One build of `out` at a time: a second invocation waits, then finds the world complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


if __name__ == "__main__":
    run_as_process(main)
