"""The run folder `runs/<name>/`: every file a training job writes, named in one place.

    config.yaml        the resolved stage config (what `pipeline.export` rebuilds the model from)
    deepspeed.json     the DeepSpeed config after "auto" values were filled in
    mlflow_run.json    {"tracking_uri", "run_id"} of the job's MLflow run (rank 0's tracker writes it)
    mlflow_outbox.json what that run has not acknowledged yet (pipeline.train.tracking_outbox)
    metrics.jsonl      one line per logged optimizer step (rank 0)
    samples/rank<r>.jsonl   the sample ledger: the keys each rank trained on, per step
    plots/             per-layer alignment plots
    checkpoints/       pipeline.train.checkpoint's layout
    export/projector.safetensors   stage 1's product, written when the run finishes
    mlflow.db, mlartifacts/        the embedded MLflow store when no tracking_uri is configured
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_path


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def of_checkpoints(cls, ckpt_dir: str | Path) -> RunFolder:
        return cls(Path(ckpt_dir).parent)

    config = property(lambda self: self.path / "config.yaml")
    deepspeed_config = property(lambda self: self.path / "deepspeed.json")
    tracking = property(lambda self: self.path / "mlflow_run.json")
    outbox = property(lambda self: self.path / "mlflow_outbox.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    plots = property(lambda self: self.path / "plots")
    export = property(lambda self: self.path / "export")
    projector = property(lambda self: self.path / "export" / "projector.safetensors")

    def ledger(self, rank: int) -> Path:
        return self.path / "samples" / f"rank{rank}.jsonl"

    def plot(self, step: int) -> Path:
        return self.plots / f"alignment_step{step:07d}.png"

    def create(self) -> RunFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def write_tracking(self, tracking_uri: str, run_id: str) -> None:
        """Where the export and the evaluation tools find the training run."""
        with atomic_path(self.tracking) as tmp:
            tmp.write_text(json.dumps({"tracking_uri": tracking_uri, "run_id": run_id}, indent=2) + "\n")

    def read_tracking(self) -> dict[str, str] | None:
        """The recorded run; its store's URI follows the folder when the store is the folder's own
        (`sqlite:///<old place>/mlflow.db` of a folder since copied or moved)."""
        if not self.tracking.is_file():
            return None
        recorded = json.loads(self.tracking.read_text())
        uri = recorded.get("tracking_uri") or ""
        own = self.path / "mlflow.db"
        if uri.startswith("sqlite:///") and uri.endswith("/mlflow.db") and own.is_file():
            recorded["tracking_uri"] = f"sqlite:///{own.resolve().as_posix()}"
        return recorded

    def append_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def append_ledger(self, rank: int, step: int, keys: list[str]) -> None:
        path = self.ledger(rank)
        path.parent.mkdir(exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"step": step, "keys": keys}) + "\n")

    def rewind(self, step: int, rank: int) -> None:
        """Drop what was written after checkpoint `step`: on a resume, those lines belong to a
        timeline that was lost. A ledger row carries the steps done before its batch, a metrics
        row the step it ends."""
        _keep_before(self.ledger(rank), step)
        if rank == 0:
            _keep_before(self.metrics, step + 1)


def _keep_before(path: Path, step: int) -> None:
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))
