"""MLflow seam of the training loop: one run per job, opened and written by global rank 0 only.

Every rank holds a `Tracker`; on other ranks (and when tracking is off) it is the same class with no
client, so the loop never branches on rank. MLflow is reached only through `MlflowClient` with an
explicit run id — no `mlflow.start_run` active-run global — so two trackers in one process never
write into each other's run.

A tracking server that is down or slow must never stop or stall training. Every MLflow call is
bounded (see `pipeline.mlflow_client.bounded_http`) and caught; the first failure of an outage is
logged as a warning with the URI and the error; metrics are buffered and re-sent at most every
`retry_interval_seconds`; artifacts logged while the server is down are dropped and counted (the
files may be rewritten by then). Bad *arguments* (invalid metric name, non-numeric value) are our
bugs and raise at once.
"""
from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.mlflow_client import (
    artifact_location,
    bounded_http,
    check_key,
    embedded_tracking_uri,
    ensure_experiment,
    error_code,
    git_commit,
    param_strings,
)

log = logging.getLogger(__name__)

_PARAMS_PER_BATCH = 100  # MLflow's limit on params (and tags) per log_batch call
_METRICS_PER_BATCH = 1000  # MLflow's limit on metrics per log_batch call
_MAX_PENDING_METRICS = 100_000  # buffer bound while the server is down; oldest are dropped first
_END_STATUSES = ("FINISHED", "KILLED", "FAILED")
# Server answers that mean "this request is wrong", not "the server is away": retrying cannot help.
_REJECTED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str | None = None  # None: embedded sqlite store + artifacts inside the run folder
    experiment: str = "tga"
    run_name: str | None = None
    plot_every_steps: int = 50  # per-layer alignment plot cadence; 0 turns plots off
    print_every_steps: int = 10  # rank 0 prints a progress line (the Slurm .out file); 0 turns it off
    enabled: bool = True
    request_timeout_seconds: int = 5  # per HTTP request to a tracking server
    retry_interval_seconds: float = 30.0  # after a failure, no new attempt before this much time

    def __post_init__(self):
        if not self.experiment:
            raise ValueError("experiment must be a non-empty name")
        lowest_values = {"plot_every_steps": 0, "print_every_steps": 0, "request_timeout_seconds": 1,
                         "retry_interval_seconds": 0}
        for name, lowest in lowest_values.items():
            if getattr(self, name) < lowest:
                raise ValueError(f"{name} must be >= {lowest}, got {getattr(self, name)}")

    def plot_due(self, step: int) -> bool:
        return self.plot_every_steps > 0 and step % self.plot_every_steps == 0

    def print_due(self, step: int) -> bool:
        return self.print_every_steps > 0 and step % self.print_every_steps == 0


class Tracker:
    """One MLflow run seen from the training loop; a no-op on non-main ranks or when disabled."""

    def __init__(self, cfg: TrackingConfig, uri: str | None = None, client=None,
                 run_id: str | None = None, experiment_id: str | None = None):
        self._cfg, self._uri, self._client = cfg, uri, client
        self._run_id, self._experiment_id = run_id, experiment_id
        self._pending: list = []  # mlflow Metric entities not yet accepted by the store
        self._down = False
        self._retry_at = 0.0  # time.monotonic() before which no call is attempted while down
        self._closed = False
        self.failed_calls = 0  # MLflow calls that raised (connection, timeout, rejection)
        self.rejected_calls = 0  # of those, requests the store refused as invalid
        self.dropped_metrics = 0
        self.dropped_artifacts = 0

    @classmethod
    def open(cls, cfg: TrackingConfig, run_dir: str | Path, *, is_main: bool, run_id: str | None = None,
             params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None) -> Tracker:
        """Rank 0: re-open `run_id` (resume) or create a run with `params`/`tags`. Other ranks: no-op.

        A store that cannot be reached gives a warning and a no-op tracker that still reports the
        given `run_id`, so the next checkpoint keeps pointing at the job's run.
        """
        param_values = param_strings(params or {})  # bad keys raise on every rank alike
        tag_values = {check_key("tag", str(k)): str(v) for k, v in (tags or {}).items()}
        if not (cfg.enabled and is_main):
            return cls(cfg)
        tag_values.setdefault("git_commit", git_commit())
        embedded = cfg.tracking_uri is None
        uri = embedded_tracking_uri(run_dir) if embedded else cfg.tracking_uri
        from mlflow import MlflowClient  # imported on rank 0 only: it is slow to import

        try:
            with bounded_http(cfg.request_timeout_seconds):
                if embedded:
                    Path(run_dir).mkdir(parents=True, exist_ok=True)
                client = MlflowClient(tracking_uri=uri)
                run = _reopen(client, run_id, tag_values, uri) if run_id else None
                if run is None:
                    artifacts = artifact_location(uri) if embedded else None
                    experiment_id = ensure_experiment(client, cfg.experiment, artifacts, uri)
                    if run_id:
                        tag_values["resumed_from_run_id"] = run_id
                    run = client.create_run(experiment_id, tags=tag_values, run_name=cfg.run_name)
        except Exception as err:  # any failure of the store: training starts without tracking
            log.warning("MLflow tracking at %s unavailable (%s: %s); training continues without tracking",
                        uri, type(err).__name__, err)
            tracker = cls(cfg, uri, run_id=run_id)
            tracker.failed_calls = 1
            return tracker
        tracker = cls(cfg, uri, client, run.info.run_id, run.info.experiment_id)
        if run.info.run_id != run_id:  # params are immutable in MLflow: only a new run gets them
            from mlflow.entities import Param

            rows = [Param(k, v) for k, v in sorted(param_values.items())]
            for chunk in (rows[i : i + _PARAMS_PER_BATCH] for i in range(0, len(rows), _PARAMS_PER_BATCH)):
                tracker._attempt("log params", lambda chunk=chunk: client.log_batch(
                    tracker.run_id, params=chunk, synchronous=True))
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
    def ui_command(self) -> str | None:
        """The shell line that shows a local store in the browser; None for servers (see run_url)."""
        if self._uri is None or self._uri.startswith(("http://", "https://")):
            return None
        return f"mlflow ui --backend-store-uri {shlex.quote(self._uri)}"

    @property
    def run_url(self) -> str | None:
        """The run's page on a tracking server; None for local stores and no-op trackers."""
        if not (self.active and self._uri.startswith(("http://", "https://"))):
            return None
        return f"{self._uri.rstrip('/')}/#/experiments/{self._experiment_id}/runs/{self._run_id}"

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue one step's metrics and send everything queued (unless the server is in its retry pause)."""
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
        if not self.active:
            return
        from mlflow.entities import Metric

        self._pending.extend(Metric(key, number, stamp, int(step)) for key, number in rows)
        overflow = len(self._pending) - _MAX_PENDING_METRICS
        if overflow > 0:
            del self._pending[:overflow]
            self.dropped_metrics += overflow
        self._flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file or folder into the run (under `artifact_path`)."""
        self._check_open()
        if artifact_path is not None:
            check_key("artifact path", artifact_path)
        path = Path(path)
        if not self.active:
            return
        if not path.exists():
            raise FileNotFoundError(f"artifact to log does not exist: {path}")
        send = self._client.log_artifacts if path.is_dir() else self._client.log_artifact
        self._artifact_call("log artifact", lambda: send(self._run_id, str(path), artifact_path))

    def close(self, status: str = "FINISHED") -> None:
        """Send what is buffered (one last try) and mark the run ended; closing twice is harmless."""
        if status not in _END_STATUSES:
            raise ValueError(f"close status must be one of {_END_STATUSES}, got {status!r}")
        if self._closed:
            return
        self._closed = True
        if not self.active:
            return
        self._retry_at = 0.0  # the last chance: ignore the retry pause
        self._flush()
        self._attempt("end run", lambda: self._client.set_terminated(self._run_id, status))
        self.dropped_metrics += len(self._pending)
        self._pending.clear()
        if self.failed_calls:
            log.warning("MLflow run %s at %s: %d tracking calls failed; %d metric values and %d artifacts "
                        "were not logged", self._run_id, self._uri, self.failed_calls,
                        self.dropped_metrics, self.dropped_artifacts)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, err, tb) -> None:
        interrupted = kind is not None and issubclass(kind, KeyboardInterrupt)
        self.close("FINISHED" if kind is None else "KILLED" if interrupted else "FAILED")

    # -- effects ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Tracker is closed; open a new one (with the run id to resume)")

    def _flush(self) -> None:
        while self._pending:
            chunk = self._pending[:_METRICS_PER_BATCH]
            outcome = self._attempt("log metrics", lambda: self._client.log_batch(
                self._run_id, metrics=chunk, synchronous=True))
            if outcome == "down":
                return
            del self._pending[: len(chunk)]
            if outcome == "rejected":  # would fail forever: drop it
                self.dropped_metrics += len(chunk)

    def _artifact_call(self, what: str, call) -> None:
        if self.active and self._attempt(what, call) != "ok":
            self.dropped_artifacts += 1

    def _attempt(self, what: str, call) -> str:
        """Run one MLflow call within the HTTP bounds → "ok", "rejected" (a bad request) or "down"."""
        if self._down and time.monotonic() < self._retry_at:
            return "down"
        try:
            with bounded_http(self._cfg.request_timeout_seconds):
                call()
        except Exception as err:  # the store's problem, never the training's
            self.failed_calls += 1
            if error_code(err) in _REJECTED:  # warned once: a deleted run would reject every step
                self.rejected_calls += 1
                if self.rejected_calls == 1:
                    log.warning("MLflow at %s rejected %s for run %s (later rejections are only counted): %s",
                                self._uri, what, self._run_id, err)
                return "rejected"
            if not self._down:
                log.warning("MLflow tracking at %s failed (%s: %s: %s); training continues, metrics are "
                            "kept and re-sent every %.0f s, artifacts are dropped until it answers",
                            self._uri, what, type(err).__name__, err, self._cfg.retry_interval_seconds)
            self._down = True
            self._retry_at = time.monotonic() + self._cfg.retry_interval_seconds
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
