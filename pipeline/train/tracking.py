"""MLflow seam of the training loop: one run per job, opened and written by global rank 0 only.

Every rank holds a `Tracker`; on other ranks (and when tracking is off) it is the same class with no
client, so the loop never branches on rank. MLflow is reached only through `MlflowClient` with an
explicit run id — no `mlflow.start_run` active-run global — so two trackers in one process never
write into each other's run.

A tracking server that is down or slow must never stall training, nor lose what it missed. `open`
talks to the store itself (bounded, once per job); after that every MLflow call of the run goes
through one sender thread (`pipeline.train.tracking_sender`), in the order the loop logged, and
`log_metrics`/`log_artifact` only queue. What the run lacks is durable in the run folder
(`pipeline.train.tracking_outbox`): metrics.jsonl holds every step, mlflow_outbox.json what MLflow
acknowledged. `close` waits up to `close_timeout_seconds` for a slow store and not at all for one
that fails; what is still owed then (one printed line says so) is sent by
`python -m pipeline.train.tracking sync RUN_DIR`, or first thing by the next resume of the job.
Bad *arguments* (invalid metric name, non-numeric value) are our bugs and raise at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.mlflow_client import (
    MAX_PARAMS_PER_BATCH,
    TOOL_REQUEST_TIMEOUT_SECONDS,
    artifact_location,
    bounded_http,
    check_key,
    embedded_tracking_uri,
    ensure_experiment,
    error_code,
    error_line,
    git_commit,
    param_strings,
    relocate_store,
)
from pipeline.train.run_folder import RunFolder
from pipeline.train.tracking_outbox import Outbox, OutboxError, send_pending, unsent_metrics
from pipeline.train.tracking_sender import Backlog, End, Sender, StepMetrics, Upload

log = logging.getLogger(__name__)

# A queue that grew through an outage of days would take host memory: past this many metric values
# the later steps are left to metrics.jsonl and `sync` (at ~50 values a step, hours of training).
_MAX_QUEUED_VALUES = 200_000
_END_STATUSES = ("FINISHED", "KILLED", "FAILED")
# Server answers that mean "this request is wrong", not "the server is away": retrying cannot help.
_REJECTED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}
SYNC_COMMAND = "python -m pipeline.train.tracking sync"


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str | None = None  # None: embedded sqlite store + artifacts inside the run folder
    experiment: str = "tga"
    run_name: str | None = None
    plot_every_steps: int = 50  # per-layer alignment plot cadence; 0 turns plots off
    print_every_steps: int = 10  # rank 0 prints a progress line (the Slurm .out file); 0 turns it off
    enabled: bool = True
    request_timeout_seconds: int = 5  # per HTTP request to a tracking server
    retry_interval_seconds: float = 30.0  # after a failure, the sender's pause before it tries again
    close_timeout_seconds: float = 30.0  # at the end, the longest wait for a slow store; the rest is left to sync

    def __post_init__(self):
        if not self.experiment:
            raise ValueError("experiment must be a non-empty name")
        lowest_values = {"plot_every_steps": 0, "print_every_steps": 0, "request_timeout_seconds": 1,
                         "retry_interval_seconds": 0, "close_timeout_seconds": 0}
        for name, lowest in lowest_values.items():
            if getattr(self, name) < lowest:
                raise ValueError(f"{name} must be >= {lowest}, got {getattr(self, name)}")

    def plot_due(self, step: int) -> bool:
        return self.plot_every_steps > 0 and step % self.plot_every_steps == 0

    def print_due(self, step: int) -> bool:
        return self.print_every_steps > 0 and step % self.print_every_steps == 0


class Tracker:
    """One MLflow run seen from the training loop; a no-op on non-main ranks or when disabled."""

    def __init__(self, cfg: TrackingConfig, uri: str | None = None, client=None, run_id: str | None = None,
                 experiment_id: str | None = None, outbox: Outbox | None = None, resume_step: int = 0):
        self._cfg, self._uri, self._client = cfg, uri, client
        self._run_id, self._experiment_id = run_id, experiment_id
        self._outbox = outbox  # None: no run to owe anything to (other ranks, tracking off, no store)
        self._sender: Sender | None = None
        self._last_step = resume_step  # the last step logged: what the run must have at the end
        self._overflow_step: int | None = None  # first step left to metrics.jsonl by a full queue
        self._down = False
        self._closed = False
        self.failed_calls = 0  # MLflow calls that raised (connection, timeout, rejection)
        self.rejected_calls = 0  # of those, requests the store refused as invalid

    @classmethod
    def open(cls, cfg: TrackingConfig, run_dir: str | Path, *, is_main: bool, run_id: str | None = None,
             resume_step: int = 0, params: Mapping[str, Any] | None = None,
             tags: Mapping[str, Any] | None = None) -> Tracker:
        """Rank 0: re-open `run_id` (a job resuming at its checkpoint's `resume_step`; what the last
        job left unsent goes first) or create a run with `params`/`tags`. Other ranks: no-op.

        A store that cannot be reached gives a warning and a tracker that sends nothing but still
        reports `run_id`, so the next checkpoint keeps pointing at the job's run, and still records
        what that run lacks, for `sync`.
        """
        param_values = param_strings(params or {})  # bad keys raise on every rank alike
        tag_values = {check_key("tag", str(k)): str(v) for k, v in (tags or {}).items()}
        if not (cfg.enabled and is_main):
            return cls(cfg)
        tag_values.setdefault("git_commit", git_commit())
        embedded = cfg.tracking_uri is None
        uri = embedded_tracking_uri(run_dir) if embedded else cfg.tracking_uri
        folder = RunFolder(run_dir)
        from mlflow import MlflowClient  # imported on rank 0 only: it is slow to import

        try:
            with bounded_http(cfg.request_timeout_seconds):
                if embedded:
                    folder.create()
                    relocate_store(uri)  # a run folder that was copied or moved
                client = MlflowClient(tracking_uri=uri)
                run = _reopen(client, run_id, tag_values, uri) if run_id else None
                if run is None:
                    artifacts = artifact_location(uri) if embedded else None
                    experiment_id = ensure_experiment(client, cfg.experiment, artifacts, uri)
                    if run_id:
                        tag_values["resumed_from_run_id"] = run_id
                    run = client.create_run(experiment_id, tags=tag_values, run_name=cfg.run_name)
        except Exception as err:  # any failure of the store: training starts without sending
            return cls._unreachable(cfg, uri, folder, run_id, resume_step, err)
        same_run = run.info.run_id == run_id
        folder.create().write_tracking(uri, run.info.run_id)
        outbox = Outbox.for_run(folder, resume_step, same_run)
        tracker = cls(cfg, uri, client, run.info.run_id, run.info.experiment_id, outbox, resume_step)
        if not same_run:  # params are immutable in MLflow: only a new run gets them
            tracker._log_params(param_values)
        owed = same_run and outbox.owes(resume_step)
        tracker._sender = Sender(tracker._attempt, client, tracker.run_id, outbox, cfg.retry_interval_seconds,
                                 Backlog(resume_step, outbox.pending_artifacts) if owed else None)
        return tracker

    @classmethod
    def _unreachable(cls, cfg: TrackingConfig, uri: str, folder: RunFolder, run_id: str | None,
                     resume_step: int, err: Exception) -> Tracker:
        """The tracker of a job whose store did not answer at the start."""
        if run_id is None:  # no run exists to send anything to later
            log.warning("MLflow tracking at %s unavailable (%s); training continues without tracking",
                        uri, error_line(err))
            tracker = cls(cfg, uri)
        else:
            log.warning("MLflow tracking at %s unavailable (%s); training continues, run %s gets its "
                        "metrics from %s later: %s %s", uri, error_line(err), run_id, folder.metrics,
                        SYNC_COMMAND, shlex.quote(str(folder.path.resolve())))
            folder.create().write_tracking(uri, run_id)
            tracker = cls(cfg, uri, run_id=run_id, outbox=Outbox.for_run(folder, resume_step, same_run=True),
                          resume_step=resume_step)
        tracker.failed_calls = 1
        return tracker

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def uri(self) -> str | None:
        """The store this tracker writes to (None for a disabled tracker)."""
        return self._uri

    @property
    def active(self) -> bool:
        """True when this tracker talks to MLflow (rank 0, enabled, the store answered at open)."""
        return self._client is not None

    @property
    def dropped_metrics(self) -> int:
        """Metric values the store refused (a deleted run): never in the run, nor sent by sync."""
        return self._sender.refused_values if self._sender else 0

    @property
    def dropped_artifacts(self) -> int:
        """Artifacts the store refused, or whose file was deleted before its turn came."""
        return self._sender.refused_artifacts if self._sender else 0

    @property
    def ui_command(self) -> str | None:
        """The shell line showing a local store in a browser (this interpreter's mlflow); None for servers."""
        if self._uri is None or self._uri.startswith(("http://", "https://")):
            return None
        return f"{shlex.quote(sys.executable)} -m mlflow ui --backend-store-uri {shlex.quote(self._uri)}"

    @property
    def run_url(self) -> str | None:
        """The run's page on a tracking server; None for local stores and no-op trackers."""
        if not (self.active and self._uri.startswith(("http://", "https://"))):
            return None
        return f"{self._uri.rstrip('/')}/#/experiments/{self._experiment_id}/runs/{self._run_id}"

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue one step's metrics for the sender: returns at once, whatever the store is doing."""
        self._check_open()
        stamp = int(time.time() * 1000)
        rows = []
        for key, value in metrics.items():
            check_key("metric", key)
            try:
                number = float(value)
            except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
                raise ValueError(f"metric {key!r} at step {step}: value {value!r} is not a number") from None
            rows.append((key, number))
        if self._outbox is None:
            return
        self._last_step = int(step)
        if self._sender is None or self._queue_full(self._last_step, len(rows)):
            return
        from mlflow.entities import Metric

        self._sender.put(StepMetrics(self._last_step, [Metric(k, v, stamp, self._last_step) for k, v in rows]))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a local file or folder for the run (under `artifact_path`); it is uploaded as it is
        when its turn comes, and stays recorded in the run folder until the store has it."""
        self._check_open()
        if artifact_path is not None:
            check_key("artifact path", artifact_path)
        path = Path(path)
        if self._outbox is None:
            return
        if not path.exists():
            raise FileNotFoundError(f"artifact to log does not exist: {path}")
        artifact = self._outbox.add_artifact(path, artifact_path)
        if self._sender is not None:
            self._sender.put(Upload(artifact))

    def drain(self, timeout_seconds: float) -> bool:
        """Wait until the store answered everything queued so far → True, or False after `timeout_seconds`."""
        return self._sender is None or self._sender.drain(timeout_seconds)

    def close(self, status: str = "FINISHED") -> None:
        """End the run with `status`: wait up to close_timeout_seconds for the queue, then leave what the
        store has not taken to `sync`, saying so in one printed line. Closing twice is harmless."""
        if status not in _END_STATUSES:
            raise ValueError(f"close status must be one of {_END_STATUSES}, got {status!r}")
        if self._closed:
            return
        self._closed = True
        if self._outbox is None:
            return
        self._outbox.end_pending(status)  # first: a job killed while it waits still ends its run on sync
        if self._sender is not None:
            self._sender.put(End(status))
            self._sender.finish(self._cfg.close_timeout_seconds)
        if self.dropped_metrics or self.dropped_artifacts:
            log.warning("MLflow run %s at %s refused %d metric values and %d artifacts: they are not in the "
                        "run", self._run_id, self._uri, self.dropped_metrics, self.dropped_artifacts)
        if self._outbox.owes(self._last_step):
            folder = self._outbox.folder.path.resolve()
            print(f"MLflow at {self._uri} lacks part of run {self._run_id} ({self._outbox.describe()}); it is "
                  f"kept in {folder}: send it with `{SYNC_COMMAND} {shlex.quote(str(folder))}` when the server "
                  "answers (a resume of the job sends it too)", flush=True)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, err, tb) -> None:
        interrupted = kind is not None and issubclass(kind, KeyboardInterrupt)
        self.close("FINISHED" if kind is None else "KILLED" if interrupted else "FAILED")

    # -- effects ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Tracker is closed; open a new one (with the run id to resume)")

    def _queue_full(self, step: int, values: int) -> bool:
        if self._overflow_step is None and self._sender.queued_values + values > _MAX_QUEUED_VALUES:
            self._overflow_step = step
            log.warning("MLflow at %s: %d metric values queued; from step %d on this job leaves metrics to "
                        "metrics.jsonl, for `%s` or the next resume", self._uri, self._sender.queued_values,
                        step, SYNC_COMMAND)
        return self._overflow_step is not None

    def _log_params(self, values: dict[str, str]) -> None:
        from mlflow.entities import Param

        rows = [Param(k, v) for k, v in sorted(values.items())]
        for first in range(0, len(rows), MAX_PARAMS_PER_BATCH):
            chunk = rows[first : first + MAX_PARAMS_PER_BATCH]
            self._attempt("log params", lambda chunk=chunk: self._client.log_batch(
                self._run_id, params=chunk, synchronous=True))

    def _attempt(self, what: str, call) -> str:
        """Run one MLflow call within the HTTP bounds → "ok", "rejected" (a bad request) or "down"."""
        try:
            with bounded_http(self._cfg.request_timeout_seconds):
                call()
        except OutboxError as err:  # a run folder file broken by hand: retrying cannot mend it
            log.warning("MLflow run %s: %s not sent: %s", self._run_id, what, err)
            return "rejected"
        except Exception as err:  # the store's problem, never the training's
            self.failed_calls += 1
            if error_code(err) in _REJECTED:  # warned once: a deleted run would reject every step
                self.rejected_calls += 1
                if self.rejected_calls == 1:
                    log.warning("MLflow at %s rejected %s for run %s (later rejections are only counted): %s",
                                self._uri, what, self._run_id, err)
                return "rejected"
            if not self._down:
                log.warning("MLflow tracking at %s failed (%s: %s); training continues, the tracker retries "
                            "every %.0f s and keeps what the run lacks in %s", self._uri, what, error_line(err),
                            self._cfg.retry_interval_seconds, self._outbox.folder.path)
            self._down = True
            return "down"
        if self._down:
            log.warning("MLflow tracking at %s answers again (%d failed calls so far)",
                        self._uri, self.failed_calls)
            self._down = False
        return "ok"


def _reopen(client, run_id: str, tags: dict[str, str], uri: str):
    """The run to append to on resume, or None (with a warning) when the store no longer has it."""
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if error_code(err) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        log.warning("MLflow run %s (from the checkpoint) is not in %s or was deleted; starting a new run "
                    "tagged resumed_from_run_id", run_id, uri)
        return None
    client.update_run(run_id, status="RUNNING")
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
    return run


class SyncError(RuntimeError):
    """Why `sync` could not send a run folder's backlog, in one line."""


def sync(folder: RunFolder, request_timeout_seconds: int = TOOL_REQUEST_TIMEOUT_SECONDS) -> str:
    """Send what the run folder's MLflow run lacks (metric steps, artifacts, end status) → a one-line
    summary. Idempotent: the outbox says what was acknowledged, so a second call sends nothing."""
    target, outbox = folder.read_tracking(), Outbox.load(folder)
    if target is None or outbox is None:
        missing = folder.tracking if target is None else folder.outbox
        raise SyncError(f"{missing} not found: nothing in {folder.path} says what an MLflow run lacks (tracking "
                        "was off, the store was down when the job started, or the job predates sync)")
    uri, run_id = target["tracking_uri"], target["run_id"]
    if not (unsent_metrics(folder, outbox.sent_through_step) or outbox.pending_artifacts or outbox.end_status):
        return f"MLflow run {run_id} at {uri} already has everything {folder.path.resolve()} holds: nothing sent"
    try:
        with bounded_http(request_timeout_seconds):
            from mlflow import MlflowClient

            relocate_store(uri)
            sent = send_pending(MlflowClient(tracking_uri=uri), run_id, outbox)
    except Exception as err:  # the store's answer, reported with what is still owed
        owed = outbox.describe(len(unsent_metrics(folder, outbox.sent_through_step)))
        raise SyncError(f"MLflow at {uri} did not take run {run_id}'s backlog ({error_line(err)}); still owed: "
                        f"{owed}; run sync again when it answers") from None
    return f"synced MLflow run {run_id} at {uri}: {sent.summary()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train.tracking",
                                     description="MLflow tracking of a training run folder.")
    commands = parser.add_subparsers(dest="command", required=True)
    sync_parser = commands.add_parser(
        "sync", help="send what the run's MLflow run lacks",
        description="Send the metric steps of metrics.jsonl, the artifacts and the end status that the MLflow "
                    "run recorded in RUN_DIR/mlflow_run.json has not received (the server was down). Running "
                    "it again sends nothing twice. Not while the job itself runs.")
    sync_parser.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    sync_parser.add_argument("--request-timeout-seconds", type=int, default=TOOL_REQUEST_TIMEOUT_SECONDS)
    args = parser.parse_args(argv)
    # MLflow prints the run's URL when a run ends: the summary line is to be this command's whole output
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        print(sync(RunFolder(args.run_dir), args.request_timeout_seconds), flush=True)
    except (SyncError, OutboxError) as err:
        print(f"sync: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
