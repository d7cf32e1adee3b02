"""pipeline/train/preemption.py: signals become a flag, ranks agree on it, Slurm requeues.

The fast tests send real signals to this process and run a recorder in place of `scontrol`. The slow
ones read the shared DeepSpeed launches of tests/ds_toy.py (2 CPU ranks, ZeRO-3, gloo), where only
rank 1 receives SIGTERM after step 7 and every rank receives more SIGTERMs during the save.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.train.checkpoint import saved_steps
from pipeline.train.preemption import PreemptionFlag, requeue_if_slurm
from tests.stage_runner import REPO


def deliver(signum: int) -> None:
    signal.raise_signal(signum)  # to this thread, so the handler has run when this returns


def recorder(tmp_path: Path, exit_code: int = 0, stderr: str = "") -> tuple[str, Path]:
    log = tmp_path / "calls.log"
    script = tmp_path / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\necho "{stderr}" >&2\nexit {exit_code}\n')
    script.chmod(0o755)
    return str(script), log


# ---------------------------------------------------------------- in this process (fast)


def test_signal_only_sets_the_flag_and_should_stop_reports_it():
    with PreemptionFlag(("SIGUSR1",)) as flag:
        assert not flag.should_stop()
        deliver(signal.SIGUSR1)
        assert flag.is_set and flag.received == "SIGUSR1"
        assert flag.should_stop()  # no process group: the local flag


def test_repeated_signals_never_raise_and_keep_the_first_name():
    with PreemptionFlag(("SIGTERM", "USR2")) as flag:
        for signum in (signal.SIGTERM, signal.SIGUSR2, signal.SIGTERM):
            deliver(signum)
        assert flag.received == "SIGTERM" and flag.signals_received == 3


def test_leaving_the_block_reinstalls_the_previous_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionFlag(("SIGUSR1",)):
        assert signal.getsignal(signal.SIGUSR1) is not before
    assert signal.getsignal(signal.SIGUSR1) is before


def test_after_ignore_from_now_a_stream_of_signals_cannot_kill_the_exiting_process():
    """A Slurm warning that lands after the last step, even during interpreter shutdown (where Python
    resets its handlers to the default action, which kills), leaves the exit code 0."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from pipeline.train.preemption import PreemptionFlag\n"
         "flag = PreemptionFlag(('SIGUSR1', 'SIGTERM'))\n"
         "flag.ignore_from_now()\n"
         "print('ready', flush=True)\n"
         "time.sleep(0.3)\n"
         "sys.exit(0)\n"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout.readline().strip() == "ready"
    sent = 0
    while child.poll() is None:
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            try:
                os.kill(child.pid, signum)
                sent += 1
            except ProcessLookupError:
                break
    assert child.wait() == 0 and sent > 10


@pytest.mark.parametrize("name", ["SIGKILL", "SIGSTOP", "SIGBOGUS"])
def test_signals_that_cannot_be_caught_are_refused_by_name(name):
    with pytest.raises(ValueError, match=f"cannot catch signal '{name}'"):
        PreemptionFlag((name,))


def test_requeue_runs_scontrol_with_the_slurm_job_id(tmp_path):
    scontrol, log = recorder(tmp_path)
    assert requeue_if_slurm({"SLURM_JOB_ID": "1234"}, scontrol=scontrol)
    assert log.read_text() == "requeue 1234\n"


def test_requeue_outside_slurm_does_nothing(tmp_path):
    scontrol, log = recorder(tmp_path)
    assert not requeue_if_slurm({}, scontrol=scontrol)
    assert not log.exists()


def test_failed_requeue_raises_with_scontrols_reason_and_the_resubmit_hint(tmp_path):
    scontrol, _ = recorder(tmp_path, exit_code=1, stderr="Requested operation is presently disabled")
    with pytest.raises(RuntimeError, match=r"presently disabled.*resubmit"):
        requeue_if_slurm({"SLURM_JOB_ID": "1234"}, scontrol=scontrol)
    with pytest.raises(RuntimeError, match="could not requeue Slurm job 1234.*resubmit"):
        requeue_if_slurm({"SLURM_JOB_ID": "1234"}, scontrol=str(tmp_path / "no-such-scontrol"))


# ---------------------------------------------------------------- real ZeRO-3, 2 CPU ranks (slow)


@pytest.mark.slow
def test_signal_on_one_rank_stops_every_rank_after_the_same_step_with_exit_0(toy):
    toy.assert_succeeded("preempted")  # the launcher exits 0 only if every rank did
    stopped = [toy.events(toy.resumed, "preempted", rank, "stopped") for rank in (0, 1)]
    assert [[e["step"] for e in per_rank] for per_rank in stopped] == [[7], [7]]
    assert [per_rank[0]["local_flag"] for per_rank in stopped] == [False, True]
    assert [sorted(toy.steps(toy.resumed, "preempted", rank)) for rank in (0, 1)] == [[5, 6, 7], [5, 6, 7]]
    for rank in (0, 1):  # both saved step 7: the next launch resumed it on every rank
        assert [e["step"] for e in toy.events(toy.resumed, "finished", rank, "resumed")] == [7]


@pytest.mark.slow
def test_signals_during_the_save_leave_a_checkpoint_that_resumes_exactly(toy):
    toy.assert_succeeded("preempted", "finished")
    # rank 1: the preemption signal plus two during the save; rank 0: two during the save, the first
    # one while it was blocked in a collective waiting for rank 1
    counts = [toy.events(toy.resumed, "preempted", rank, "stopped")[0]["signals_received"] for rank in (0, 1)]
    assert counts == [2, 3]
    for rank in (0, 1):
        reference = toy.steps(toy.reference, "reference", rank)
        for step, entry in toy.steps(toy.resumed, "finished", rank).items():
            assert entry["loss"] == reference[step]["loss"], (rank, step)
    assert saved_steps(toy.resumed / "checkpoints", complete=False) == []


@pytest.mark.slow
def test_preempted_job_requeues_itself_once_from_rank_zero(toy):
    toy.assert_succeeded("preempted")
    assert toy.requeue_log.read_text() == "requeue 4242\n"
    requeued = [toy.events(toy.resumed, "preempted", rank, "stopped")[0]["requeued"] for rank in (0, 1)]
    assert requeued == [True, False]
