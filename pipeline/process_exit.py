"""How a pipeline process ends: with its own exit code, never with an abort at interpreter exit.

A stage process has native threads that Python does not own: Arrow's CPU pool (after reading a
parquet file), the tokenizers' Rayon pool, gloo's and torch's worker threads. At a normal exit
(`sys.exit`, or the end of `__main__`) the interpreter finalises, then the C library runs the C++
static destructors; a destructor that finds one of those threads still joinable calls
std::terminate: "terminate called without an active exception", SIGABRT, exit 134, whatever the
process meant to return (apache/arrow#34314, #50482; seen here after a stage printed its clear
error lines, in about half the runs). A scheduler counts that as a crash.

`run_as_process(main)` therefore ends every path the same way: the exit code the code asked for
(SystemExit's code or message, 1 with the traceback for an exception, 130 for Ctrl-C), Python's
own exit steps run (its non-daemon threads joined, then atexit: multiprocessing's children, MLflow, temporary folders), stdout,
stderr and logging flushed, and then `os._exit`, which skips the C++ static destructors.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import traceback
from typing import Callable, NoReturn

INTERRUPTED = 130  # what a shell reports for a process ended by Ctrl-C (128 + SIGINT)


def exit_code(main: Callable[[], object]) -> int:
    """Run `main` and return the exit code a normal Python exit would have given it (printing a
    SystemExit message or a traceback to stderr, as the interpreter does)."""
    try:
        main()
    except SystemExit as exit_:
        return _system_exit_code(exit_.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        return INTERRUPTED
    except BaseException:  # noqa: BLE001 — reported like the interpreter would, then exit 1
        traceback.print_exc()
        return 1
    return 0


def run_as_process(main: Callable[[], object]) -> NoReturn:
    """The `if __name__ == "__main__"` of a pipeline command: `main`'s exit code, reliably."""
    code = exit_code(main)
    try:
        # The interpreter's own first exit step: thread-pool executors told to stop, then every
        # non-daemon thread joined (joining idle pool workers before that would wait forever).
        threading._shutdown()
        atexit._run_exitfuncs()
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing left to say
                pass
        os._exit(code)


def _system_exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1
