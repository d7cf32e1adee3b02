"""`python -m pipeline.tinyworld --out DIR [--seed 0]`: generate the tiny world, print counts and metrics."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .world import generate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tinyworld",
                                     description="Generate the tiny world (deterministic, offline).")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder to (re)generate the world in: new, empty, or holding an older world")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        paths = generate(args.out, args.seed)
    except (FileExistsError, FileNotFoundError) as err:
        raise SystemExit(f"tinyworld: {err}") from None
    world = json.loads(paths.world_json.read_text())
    print(json.dumps({"out": str(paths.root), "seconds": round(time.perf_counter() - start, 1),
                      "counts": world["counts"], "metrics": world["metrics"]}, indent=2))


if __name__ == "__main__":
    main()
