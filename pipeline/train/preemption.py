"""Preemption: a signal becomes a flag, ranks agree on it at a step boundary, Slurm requeues the job.

Slurm (`--signal=B:USR1@<grace>`), a scheduler's SIGTERM or a user's `kill` reaches some ranks and not
others, at any moment. Acting inside the handler would tear a step or a checkpoint apart, so the
handler only records the signal. The training loop asks `should_stop()` after each optimizer step:
an all-reduce(MAX) of the local flags, so every rank stops after the same step, saves the same
checkpoint and exits 0.

Handlers never raise and never exit. A second signal (or the first one) arriving while a
checkpoint is being written therefore only sets the flag again; the save runs to its end. The one
signal no handler sees, SIGKILL after the grace time, is covered by the checkpoint's COMPLETE
marker: a save cut short is never loaded.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)


class PreemptionFlag:
    """Installs handlers for `signals` (names such as "SIGTERM") that only set a flag.

    Construct it in the main thread (Python delivers signals there). `restore()` or leaving the
    `with` block reinstalls the previous handlers.
    """

    def __init__(self, signals: Sequence[str] = ("SIGTERM", "SIGUSR1")):
        self.received: str | None = None  # name of the first signal caught, for the log
        self._count = 0
        self._previous: dict[signal.Signals, object] = {}
        self.signals = signal_names(signals)
        for name in signals:
            signum = _signal_by_name(name)
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        # Runs between two bytecodes of the main thread, possibly in the middle of a save:
        # plain assignments only, nothing that can raise, block or do I/O.
        if self.received is None:
            self.received = signal.Signals(signum).name
        self._count += 1

    @property
    def is_set(self) -> bool:
        """Whether this process has received one of the signals."""
        return self.received is not None

    @property
    def signals_received(self) -> int:
        return self._count

    def should_stop(self) -> bool:
        """True on every rank if any rank has the flag; call it at a step boundary.

        A collective: every rank must call it at the same step. Without an initialized process group
        it is the local flag.
        """
        # Imported here, not at module import: the stage entry imports this module before torch, so
        # a signal during start-up is already caught.
        from pipeline.train.distributed import any_rank

        stop = any_rank(self.is_set)[0]
        if stop:
            origin = f"received {self.received}" if self.is_set else "signal received on another rank"
            log.info("preemption: stopping at this step boundary (%s)", origin)
        return stop

    def ignore_from_now(self) -> None:
        """Ignore the signals for the rest of the process: the run is finished or checkpointed.

        Python resets its own handlers to the default action while the interpreter shuts down, so a
        Slurm warning that arrives after the last step (while DeepSpeed, MLflow and the loader
        workers close) would kill a finished rank and fail the job. An ignored signal stays ignored.
        """
        for name in self.signals:
            signal.signal(_signal_by_name(name), signal.SIG_IGN)
        self._previous.clear()

    def restore(self) -> None:
        """Reinstall the handlers that were there before this flag."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionFlag:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def requeue_if_slurm(environ: Mapping[str, str] = os.environ, scontrol: str = "scontrol") -> bool:
    """On global rank 0 of a Slurm job, `scontrol requeue <SLURM_JOB_ID>`; True if it requeued.

    Call it last, after the checkpoint is complete on every rank: Slurm terminates a running job it
    requeues (SIGTERM, which our handlers absorb, then SIGKILL after KillWait). The next allocation
    resumes from `latest`. `environ` is where the job id is read (launch scripts export Slurm's
    variables); `scontrol` is the command to run.
    """
    from pipeline.train.distributed import rank_and_world  # torch: not at module import (see should_stop)

    job_id = environ.get("SLURM_JOB_ID")
    if not job_id or rank_and_world()[0] != 0:
        return False
    command = [scontrol, "requeue", job_id]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"could not requeue Slurm job {job_id} ({' '.join(command)}): {err}. The "
                           "checkpoint is complete: resubmit the job to resume") from None
    if done.returncode != 0:
        raise RuntimeError(f"'{' '.join(command)}' failed with exit code {done.returncode}: "
                           f"{done.stderr.strip() or done.stdout.strip()}. The checkpoint is complete: "
                           "resubmit the job to resume (is the job submitted with --requeue?)")
    log.info("requeued Slurm job %s", job_id)
    return True


def signal_names(names: Sequence[str]) -> tuple[str, ...]:
    """Canonical names ("usr1" → "SIGUSR1"); refuses signals that cannot be caught."""
    return tuple(_signal_by_name(name).name for name in names)


def _signal_by_name(name: str) -> signal.Signals:
    key = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
    if key not in signal.Signals.__members__ or key in ("SIGKILL", "SIGSTOP"):
        raise ValueError(f"cannot catch signal '{name}'; use names such as SIGTERM, SIGUSR1, SIGUSR2")
    return signal.Signals[key]


def flag_for(signals: list[str], early: PreemptionFlag | None = None) -> PreemptionFlag:
    """The flag for the configured `signals`, keeping a signal the entry's `early` (default) flag
    caught while the config was not yet read."""
    if early is not None and set(early.signals) == set(signal_names(signals)):
        return early
    if early is not None:
        early.restore()
    flag = PreemptionFlag(signals)
    if early is not None and early.is_set:
        flag.received = early.received
    return flag
