"""Progress bars that read well both on a terminal and in a Slurm `.out` file.

On a terminal: tqdm's bar, redrawn in place. Anywhere else (a log file, a pipe): tqdm with a long
`mininterval` whose redraws become plain lines, so a job log gets one complete line every
LOG_INTERVAL_S seconds instead of a carriage-return-separated stream of bars.
"""
from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class _Lines:
    """A stream for tqdm that turns each in-place redraw into one line."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(total: int, desc: str, unit: str = "sample", stream: TextIO | None = None) -> tqdm:
    stream = stream if stream is not None else sys.stderr
    if stream.isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=stream)
    return tqdm(total=total, desc=desc, unit=unit, file=_Lines(stream), mininterval=LOG_INTERVAL_S,
                maxinterval=LOG_INTERVAL_S * 4, ascii=True, dynamic_ncols=False, ncols=100)

