"""The one thread that calls MLflow for a run once the tracker has opened it.

The training thread only queues (`put` never waits on the network). Items leave the queue when the
store has answered them (taken or refused), in the order they were queued: an outage holds everything
behind the call that failed, which is retried every `retry_interval_seconds`. Each answer is marked
in the run folder's outbox at once (`pipeline.train.tracking_outbox`), so stopping at any moment
leaves nothing that `sync` cannot send. The thread never raises: the tracker's `attempt` bounds,
catches and classifies every call, and warns about outages.
"""
from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.mlflow_client import MAX_METRICS_PER_BATCH
from pipeline.train.tracking_outbox import Artifact, Outbox, send_pending, step_batches, upload_artifact

log = logging.getLogger("pipeline.train.tracking")


@dataclass(frozen=True)
class StepMetrics:
    step: int
    rows: list  # mlflow Metric entities, stamped when the loop logged them


@dataclass(frozen=True)
class Upload:
    artifact: Artifact


@dataclass(frozen=True)
class Backlog:
    """What an earlier job of this run left unsent, up to the step this job resumes at."""
    through_step: int
    artifacts: list[Artifact]


@dataclass(frozen=True)
class End:
    status: str


class Sender:
    """`attempt(what, call)` runs one bounded MLflow call → "ok", "rejected" or "down"."""

    def __init__(self, attempt: Callable[[str, Callable[[], object]], str], client, run_id: str, outbox: Outbox,
                 retry_interval_seconds: float, backlog: Backlog | None = None):
        self._attempt, self._client, self._run_id, self._outbox = attempt, client, run_id, outbox
        self._retry_interval_seconds = retry_interval_seconds
        self._items: collections.deque = collections.deque([backlog] if backlog else [])
        self._changed = threading.Condition()
        self._wake = threading.Event()  # cuts a retry pause short: close's last try, or stopping
        self._closing = self._stopped = False
        self.queued_values = 0  # metric values in the queue (the tracker bounds it)
        self.refused_values = 0  # metric values the store refused: never in the run
        self.refused_artifacts = 0  # refused, or the file was gone when its turn came
        self._thread = threading.Thread(target=self._run, name="mlflow-sender", daemon=True)
        self._thread.start()

    def put(self, item: StepMetrics | Upload | End) -> None:
        with self._changed:
            self._items.append(item)
            self.queued_values += _values(item)
            self._changed.notify_all()

    def drain(self, timeout_seconds: float) -> bool:
        """Wait until the store answered everything queued → True, or False after `timeout_seconds`."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._items, timeout_seconds)

    def finish(self, timeout_seconds: float) -> bool:
        """Send what is queued for at most `timeout_seconds`, and stop at the first call that fails (one
        waiting for its retry is tried once more at once): a dead store costs the job's end one refused
        connection, a slow one at most the timeout. A call in flight still ends within its own bound.
        → True when everything was delivered."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._wake.set()
        self._thread.join(timeout_seconds)
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
            delivered = not self._items
        self._wake.set()
        return delivered

    def _run(self) -> None:
        while (work := self._next()) is not None:
            if not self._deliver(work):
                return
            with self._changed:
                for _ in work:
                    self.queued_values -= _values(self._items.popleft())
                self._changed.notify_all()

    def _next(self) -> list | None:
        """The next items to send together (consecutive steps, up to one batch), or None to stop."""
        with self._changed:
            self._changed.wait_for(lambda: self._items or self._closing or self._stopped)
            if self._stopped or not self._items:
                return None
            if not isinstance(self._items[0], StepMetrics):
                return [self._items[0]]
            work, values = [], 0
            for item in self._items:
                if not isinstance(item, StepMetrics):
                    break
                if work and values + len(item.rows) > MAX_METRICS_PER_BATCH:
                    break
                work.append(item)
                values += len(item.rows)
            return work

    def _deliver(self, work: list) -> bool:
        """Send `work` until the store answers → True; False when stopped first (it stays owed)."""
        head = work[0]
        if isinstance(head, StepMetrics):
            return self._send_metrics(work)
        if isinstance(head, Upload):
            return self._send_artifact(head.artifact)
        if isinstance(head, Backlog):
            return self._answered("send what the last job left", lambda: send_pending(
                self._client, self._run_id, self._outbox, through_step=head.through_step,
                artifacts=head.artifacts, end=False)) is not None
        answer = self._answered("end run", lambda: self._client.set_terminated(self._run_id, head.status))
        if answer is not None:  # a refused end cannot succeed later either
            self._outbox.end_sent()
        return answer is not None

    def _send_metrics(self, work: list[StepMetrics]) -> bool:
        for rows, through in step_batches((item.step, item.rows) for item in work):
            answer = self._answered("log metrics", lambda rows=rows: self._client.log_batch(
                self._run_id, metrics=rows, synchronous=True))
            if answer is None:
                return False
            if answer == "rejected":
                self.refused_values += len(rows)
            if through is not None:
                self._outbox.metrics_sent(through)
        return True

    def _send_artifact(self, artifact: Artifact) -> bool:
        if not self._outbox.local_path(artifact).exists():
            log.warning("artifact %s was deleted before it could be sent to MLflow run %s",
                        artifact[0], self._run_id)
            self.refused_artifacts += 1
            self._outbox.artifact_sent(artifact)
            return True
        answer = self._answered("log artifact", lambda: upload_artifact(self._client, self._run_id, self._outbox,
                                                                        artifact))
        if answer == "rejected":
            self.refused_artifacts += 1
            self._outbox.artifact_sent(artifact)
        return answer is not None

    def _answered(self, what: str, call: Callable[[], object]) -> str | None:
        """"ok" or "rejected" once the store answered `call`; None when stopped before it did."""
        while not self._stopped:
            answer = self._attempt(what, call)
            if answer != "down":
                return answer
            if self._closing:  # the job is ending: a store that fails now gets no more of its time
                return None
            self._wake.wait(self._retry_interval_seconds)
            self._wake.clear()
        return None


def _values(item) -> int:
    return len(item.rows) if isinstance(item, StepMetrics) else 0
