"""A stage process ends with the exit code it means, whatever native threads are alive at exit
(pipeline/process_exit.py).

The abort the issue saw ("terminate called without an active exception", exit 134) comes from a
C++ destructor that the C library runs at `exit()`, after the interpreter finalised: not
reproducible on demand with Arrow's pool or gloo. The tests plant a deterministic stand-in for such
a destructor: `abort` registered with the C library's own exit handlers (`__cxa_atexit`, where C++
static destructors live), so any process that leaves through `exit()` aborts, and one that leaves
through `os._exit` after flushing does not."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from pipeline.process_exit import exit_code
from tests.stage_runner import REPO, stage_env

_PLANT_ABORT = """
import ctypes, runpy, sys
libc = ctypes.CDLL(None)
libc.__cxa_atexit(ctypes.cast(libc.abort, ctypes.c_void_p), None, None)
"""
# Runs a module as __main__ after planting the abort; the module's argv follows.
_MODULE_WITH_ABORT_AT_EXIT = _PLANT_ABORT + """
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_with_abort_at_exit(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _MODULE_WITH_ABORT_AT_EXIT, module, *args], cwd=REPO, env=stage_env(),
                          capture_output=True, text=True, timeout=600)


def test_the_planted_destructor_aborts_a_process_that_exits_normally():
    """The stand-in is faithful: a plain `sys.exit(1)` ends in SIGABRT, as in the issue."""
    done = subprocess.run([sys.executable, "-c", _PLANT_ABORT + "sys.exit(1)"], capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGABRT


@pytest.mark.parametrize("extra", [[], ["--dry-run"]], ids=["start", "dry-run"])
def test_an_empty_model_folder_ends_the_stage_with_exit_1_and_its_problem_lines(tiny_world, tmp_path, extra):
    empty = tmp_path / "llm"
    empty.mkdir()
    done = run_with_abort_at_exit("stages.stage1_align", "--config", "configs/tiny/stage1.yaml",
                                  f"model.llm={empty}", f"model.vision_tower={tiny_world.clip}",
                                  f"run_dir={tmp_path / 'run'}", *extra)
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"model.llm={empty}: not a model folder" in done.stderr
    assert "Traceback" not in done.stderr


def test_help_ends_the_stage_with_exit_0():
    done = run_with_abort_at_exit("stages.stage2_instruct", "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--dry-run" in done.stdout


@pytest.mark.parametrize("main,code,printed", [
    (lambda: None, 0, ""),
    (lambda: sys.exit(3), 3, ""),
    (lambda: sys.exit("config error: no such file"), 1, "config error: no such file"),
    (lambda: 1 / 0, 1, "ZeroDivisionError"),
], ids=["returns", "exit-3", "exit-message", "exception"])
def test_exit_code_is_what_the_interpreter_would_have_returned(main, code, printed, capsys):
    assert exit_code(main) == code
    assert printed in capsys.readouterr().err


def test_an_idle_thread_pool_and_a_working_thread_end_as_at_a_normal_exit():
    """Python's exit stops idle pool workers and waits for non-daemon threads; so does ours, then
    skips the destructors."""
    script = _PLANT_ABORT + """
import concurrent.futures, threading
from pipeline.process_exit import run_as_process
pool = concurrent.futures.ThreadPoolExecutor(2)
pool.submit(int).result()
go = threading.Event()
worker = threading.Thread(target=lambda: (go.wait(), print("worker finished", flush=True)))
worker.start()
run_as_process(lambda: (go.set(), sys.exit(5)))  # the worker is still to print when main ends
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=stage_env(), capture_output=True, text=True,
                          timeout=120)
    assert (done.returncode, done.stdout) == (5, "worker finished\n"), done.stderr
