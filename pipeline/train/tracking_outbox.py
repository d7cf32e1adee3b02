"""What of a run folder its MLflow run has not acknowledged yet, and sending it there.

metrics.jsonl already holds every logged step, so what is owed to MLflow is a small record
(`mlflow_outbox.json`): the last step MLflow took (every metrics.jsonl line up to it is in the run:
steps only grow within one timeline), the artifacts not uploaded yet and an end status not set yet.
It is rewritten atomically after every change, so a process killed at any moment leaves a record
that is at worst behind (one batch sent twice), never ahead (a step lost).

The tracker's sender thread marks what MLflow acknowledged; `send_pending` sends what the record
names (the first job of a resumed tracker, and `python -m pipeline.train.tracking sync RUN_DIR`).
This module never decides *when* to talk to MLflow, and never catches a store's failure: callers
bound the calls and retry.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.atomic import atomic_path
from pipeline.mlflow_client import MAX_METRICS_PER_BATCH
from pipeline.train.run_folder import RunFolder

Artifact = tuple[str, str | None]  # (file as recorded, artifact folder in the run)


class OutboxError(ValueError):
    """A run folder whose tracking record cannot be read (the message names the file)."""


class Outbox:
    """The record of one run folder. Thread-safe: the training thread adds artifacts and the end
    status while the sender thread marks what was acknowledged."""

    def __init__(self, folder: RunFolder, sent_through_step: int = 0, artifacts: Iterable[Artifact] = (),
                 end_status: str | None = None):
        self.folder = folder
        self._sent_through_step = sent_through_step
        self._artifacts = list(artifacts)
        self._end_status = end_status
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: RunFolder) -> Outbox | None:
        """The folder's record, or None when it has none (tracking off, or written before outboxes)."""
        path = folder.outbox
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            return cls(folder, int(record["sent_through_step"]),
                       [(str(file), where) for file, where in record["pending_artifacts"]], record["end_status"])
        except (ValueError, KeyError, TypeError) as err:
            raise OutboxError(f"{path}: not a tracking outbox ({type(err).__name__}: {err}); restore it, or "
                              "delete it to take what the run lacks as sent") from None

    @classmethod
    def for_run(cls, folder: RunFolder, resume_step: int, same_run: bool) -> Outbox:
        """The record a tracker starts from, saved. A new run owes nothing before `resume_step` (0 for a
        fresh job). A resumed run keeps what it owes up to its checkpoint (later lines are rewound), but
        not its end status: this job ends the run again."""
        old = cls.load(folder) if same_run else None
        if old is None:
            outbox = cls(folder, resume_step)
        else:
            outbox = cls(folder, min(old.sent_through_step, resume_step), old.pending_artifacts)
        outbox._save()
        return outbox

    @property
    def sent_through_step(self) -> int:
        return self._sent_through_step

    @property
    def pending_artifacts(self) -> list[Artifact]:
        with self._lock:
            return list(self._artifacts)

    @property
    def end_status(self) -> str | None:
        return self._end_status

    def owes(self, last_step: int) -> bool:
        """Whether MLflow lacks anything, `last_step` being the last step logged."""
        with self._lock:
            return self._sent_through_step < last_step or bool(self._artifacts) or self._end_status is not None

    def describe(self, steps: int | None = None) -> str:
        """What is owed, in words: "metrics after step 3, 1 artifact, end status FINISHED" (with the
        count of `steps` owed, when the caller read metrics.jsonl: "6 metric steps, ...")."""
        with self._lock:
            parts = [f"metrics after step {self._sent_through_step}" if steps is None
                     else _count(steps, "metric step")]
            if self._artifacts:
                parts.append(_count(len(self._artifacts), "artifact"))
            if self._end_status:
                parts.append(f"end status {self._end_status}")
            return ", ".join(parts)

    def local_path(self, artifact: Artifact) -> Path:
        return self.folder.path / artifact[0]

    def metrics_sent(self, through_step: int) -> None:
        """Every line up to `through_step` is in the run (assigned, not maxed: after a resume the steps
        restart below what the lost timeline had sent)."""
        with self._lock:
            self._sent_through_step = through_step
            self._save_locked()

    def add_artifact(self, path: Path, artifact_path: str | None) -> Artifact:
        """Record a file to upload; inside the run folder it is kept relative, so a copied folder syncs."""
        path, root = Path(path).resolve(), self.folder.path.resolve()
        artifact = (path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path), artifact_path)
        with self._lock:
            if artifact not in self._artifacts:  # one upload of the file as it is then serves both
                self._artifacts.append(artifact)
                self._save_locked()
        return artifact

    def artifact_sent(self, artifact: Artifact) -> None:
        with self._lock:
            if artifact in self._artifacts:
                self._artifacts.remove(artifact)
                self._save_locked()

    def end_pending(self, status: str) -> None:
        with self._lock:
            self._end_status = status
            self._save_locked()

    def end_sent(self) -> None:
        with self._lock:
            self._end_status = None
            self._save_locked()

    def _save(self) -> None:
        with self._lock:
            self._save_locked()

    def _save_locked(self) -> None:
        record = {"sent_through_step": self._sent_through_step,
                  "pending_artifacts": [list(a) for a in self._artifacts], "end_status": self._end_status}
        with atomic_path(self.folder.outbox) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")


def unsent_metrics(folder: RunFolder, after_step: int,
                   through_step: int | None = None) -> list[tuple[int, dict[str, float]]]:
    """metrics.jsonl lines with `after_step < step <= through_step` (no upper bound for None), in file
    order. A last line cut short (the process died mid-write) never was a logged step: skipped."""
    path = folder.metrics
    lines = path.read_text().splitlines() if path.is_file() else []
    steps = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            raise OutboxError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise OutboxError(f"{path}:{number}: a metrics line without its step")
        step = record.pop("step")
        if after_step < step and (through_step is None or step <= through_step):
            try:
                steps.append((step, {key: float(value) for key, value in record.items()}))
            except (TypeError, ValueError):
                raise OutboxError(f"{path}:{number}: step {step} has a value that is not a number") from None
    return steps


def step_batches(steps: Iterable[tuple[int, list]]) -> Iterator[tuple[list, int | None]]:
    """(step, metric rows) → (rows of one log_batch call, the step it completes or None). Batches hold
    whole steps, so acknowledging one marks a step; a step larger than a batch marks on its last."""
    batch: list = []
    through = None
    for step, rows in steps:
        if batch and len(batch) + len(rows) > MAX_METRICS_PER_BATCH:
            yield batch, through
            batch = []
        while len(rows) > MAX_METRICS_PER_BATCH:
            yield rows[:MAX_METRICS_PER_BATCH], None
            rows = rows[MAX_METRICS_PER_BATCH:]
        batch += rows
        through = step
    if batch:
        yield batch, through


@dataclasses.dataclass
class Sent:
    """What one `send_pending` delivered."""
    steps: int = 0
    values: int = 0
    artifacts: int = 0
    missing_files: list[str] = dataclasses.field(default_factory=list)
    end_status: str | None = None

    def summary(self) -> str:
        parts = [f"{_count(self.steps, 'step')} ({_count(self.values, 'value')})",
                 _count(self.artifacts, "artifact")]
        if self.end_status:
            parts.append(f"status {self.end_status}")
        if self.missing_files:
            gone = _count(len(self.missing_files), "artifact file")
            parts.append(f"{gone} gone: {', '.join(self.missing_files)}")
        return ", ".join(parts)


def send_pending(client, run_id: str, outbox: Outbox, *, through_step: int | None = None,
                 artifacts: list[Artifact] | None = None, end: bool = True) -> Sent:
    """Send what `outbox` owes, in order: metric steps (up to `through_step`), then `artifacts` (default:
    all pending), then the end status (when `end`). Each acknowledged part is marked at once, so a
    failure part way (raised, for the caller to retry) resumes where it stopped."""
    from mlflow.entities import Metric

    sent = Sent()
    stamp = int(time.time() * 1000)  # metrics.jsonl keeps no wall time: the points carry the sync's
    steps = [(step, [Metric(key, value, stamp, step) for key, value in values.items()])
             for step, values in unsent_metrics(outbox.folder, outbox.sent_through_step, through_step)]
    for rows, through in step_batches(steps):
        client.log_batch(run_id, metrics=rows, synchronous=True)
        if through is not None:
            outbox.metrics_sent(through)
        sent.values += len(rows)
    sent.steps = len(steps)
    pending = outbox.pending_artifacts  # a retry after a failure part way skips what went already
    for artifact in pending if artifacts is None else [a for a in artifacts if a in pending]:
        if upload_artifact(client, run_id, outbox, artifact):
            sent.artifacts += 1
        else:
            sent.missing_files.append(artifact[0])
    if end and outbox.end_status is not None:
        sent.end_status = outbox.end_status
        client.set_terminated(run_id, sent.end_status)
        outbox.end_sent()
    return sent


def upload_artifact(client, run_id: str, outbox: Outbox, artifact: Artifact) -> bool:
    """Upload a file or folder as it is now; False when it is gone (it is no longer pending either way)."""
    path = outbox.local_path(artifact)
    found = path.exists()
    if found:
        send = client.log_artifacts if path.is_dir() else client.log_artifact
        send(run_id, str(path), artifact[1])
    outbox.artifact_sent(artifact)
    return found


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"
