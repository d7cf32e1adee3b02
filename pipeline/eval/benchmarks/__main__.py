"""python -m pipeline.eval.benchmarks NAME --data DOWNLOAD --out DIR (see __init__.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.eval.benchmarks import READERS, BenchmarkError, Selection, add_selection_arguments, prepare


def selection_of(args: argparse.Namespace) -> Selection:
    return Selection(tuple(args.scenarios), tuple(args.splits), args.limit)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pipeline.eval.benchmarks", description=__doc__)
    parser.add_argument("name", choices=sorted(READERS))
    parser.add_argument("--data", required=True, type=Path, help="the benchmark's download folder")
    parser.add_argument("--out", required=True, type=Path, help="output: records.json, images/, benchmark.json")
    parser.add_argument("--images", type=Path, default=None,
                        help="the benchmark's picture folder when it is not where the layout puts it")
    add_selection_arguments(parser)
    parser.add_argument("--limit", type=int, default=None,
                        help="at most N questions per split and scenario (smoke runs)")
    args = parser.parse_args(argv)
    try:
        info = prepare(args.name, args.data, args.out, selection_of(args), args.images)
    except BenchmarkError as err:
        raise SystemExit(f"benchmarks error: {err}") from None
    print(f"{info['benchmark']} ({info['layout']}): {info['records']} records, {info['text_twins']} text twins, "
          f"splits {info['splits']}, {len(info['scenarios'])} scenarios -> {args.out / 'records.json'}")
    return info


if __name__ == "__main__":
    main(sys.argv[1:])
