"""Readers of the published visual-safety benchmarks: a local download -> DSR eval records.

    python -m pipeline.eval.benchmarks NAME --data DOWNLOAD --out DIR [--images DIR]
        [--scenarios S ...] [--splits S ...] [--limit N]

NAME: mm-safetybench (HF parquet or GitHub layout), figstep (SafeBench), vlguard (test set). DIR gets
records.json + images/ + benchmark.json (common.py); the retrieval join (`image_caption=none`) and
`python -m pipeline.eval.dsr --data DIR/records.json` read it like any eval file, and
`pipeline.eval.dsr --benchmark NAME --data DOWNLOAD` does this step itself. Nothing is downloaded:
docs/evaluation.md says where each benchmark comes from and under which licence.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.eval.benchmarks import figstep, mm_safetybench, vlguard
from pipeline.eval.benchmarks.common import BenchmarkError, Selection, write_records

READERS = {mm_safetybench.NAME: mm_safetybench.read, figstep.NAME: figstep.read, vlguard.NAME: vlguard.read}


def prepare(name: str, data: Path, out: Path, selection: Selection = Selection(),
            images: Path | None = None) -> dict:
    """Read benchmark `name` from the download `data` into `out`; returns benchmark.json's content."""
    if name not in READERS:
        raise BenchmarkError(f"unknown benchmark {name!r}; one of {', '.join(READERS)}")
    data = Path(data)
    if not data.is_dir():
        raise BenchmarkError(f"{data}: benchmark download folder not found")
    if images is not None and not Path(images).is_dir():
        raise BenchmarkError(f"{images}: image folder not found")
    layout, items = READERS[name](data, selection, Path(images) if images is not None else None)
    out.mkdir(parents=True, exist_ok=True)
    return write_records(items, out, benchmark=name, layout=layout, source=data)


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """--scenarios / --splits (--limit is each tool's own: per split and scenario here)."""
    parser.add_argument("--scenarios", nargs="+", default=(), help="only these scenarios (topics, categories)")
    parser.add_argument("--splits", nargs="+", default=(),
                        help="only these splits (mm-safetybench: SD SD_TYPO TYPO; figstep: SafeBench SafeBench-Tiny; "
                             "vlguard: unsafes safe_unsafes safe_safes)")


__all__ = ["READERS", "BenchmarkError", "Selection", "add_selection_arguments", "prepare"]
