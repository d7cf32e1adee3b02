"""MLflow seam of the analysis and evaluation tools: where a report goes, and logging it there.

A report is files already written to disk (JSON, PNG) plus a few summary metrics and params. It goes
into the training run of the analysed model when that run is known (explicit `--mlflow-run-id`, or
the run recorded in the export's `tga_training.json`), so the safety-layer and alignment numbers sit
next to the training curves; otherwise into a new run of its own. MLflow is reached only through
`MlflowClient` with explicit run ids, and a store that cannot be reached is a warning: the results
are on disk already.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.train.tracking import bounded_http, check_key, ensure_experiment, git_commit, param_strings

if TYPE_CHECKING:
    from pipeline.analysis.model_folder import LoadedModel

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "tga-eval"
_REQUEST_TIMEOUT_SECONDS = 10


@dataclass(frozen=True)
class MlflowTarget:
    tracking_uri: str
    run_id: str | None  # an existing (training) run to report into; None = a new run per report
    experiment: str
    model_name: str  # the model folder's name, tagged on new runs


def add_mlflow_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("MLflow (default: the training run recorded in the model folder)")
    group.add_argument("--mlflow-uri", default=None,
                       help="tracking URI (http://…, sqlite:///…); default: the training run's store")
    group.add_argument("--mlflow-run-id", default=None,
                       help="log into this existing run (artifacts under eval/<tool>/, metrics <tool>/…)")
    group.add_argument("--mlflow-experiment", default=DEFAULT_EXPERIMENT,
                       help=f"experiment of a new run (default: {DEFAULT_EXPERIMENT})")
    group.add_argument("--no-mlflow", action="store_true", help="write the files only")


def resolve_target(args: argparse.Namespace, loaded: LoadedModel) -> MlflowTarget | None:
    """Explicit arguments first, then the training run of `loaded`, then nothing (said on stdout)."""
    name = loaded.path.resolve().name
    if args.no_mlflow:
        print("MLflow: off (--no-mlflow); results are only on disk", flush=True)
        return None
    recorded_uri = loaded.training.get("tracking_uri")
    if args.mlflow_run_id:
        uri = args.mlflow_uri or recorded_uri
        if not uri:
            raise ValueError(f"--mlflow-run-id {args.mlflow_run_id} needs --mlflow-uri ({loaded.path} "
                             "records no tracking URI)")
        return MlflowTarget(uri, args.mlflow_run_id, args.mlflow_experiment, name)
    if args.mlflow_uri:
        return MlflowTarget(args.mlflow_uri, None, args.mlflow_experiment, name)
    if recorded_uri:
        return MlflowTarget(recorded_uri, loaded.training.get("run_id"), args.mlflow_experiment, name)
    print(f"MLflow: nothing logged ({loaded.path} records no training run; pass --mlflow-uri to log)",
          flush=True)
    return None


def log_report(target: MlflowTarget | None, *, name: str, files: list[Path], metrics: dict[str, float],
               params: dict[str, str]) -> str | None:
    """Log one report; returns the run id, or None when nothing was logged.

    Into an existing run: artifacts under `eval/<name>/`, metrics `<name>/<key>`, params as tags
    `<name>.<key>` (MLflow params cannot change, and a tool may run again on the same run). A new
    run is named `<name>` and tagged `tga.tool` / `tga.model`.
    """
    if target is None:
        return None
    check_key("report", name)
    metric_values = {check_key("metric", k): float(v) for k, v in metrics.items()}
    param_values = param_strings(params)
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"report files to log do not exist: {', '.join(missing)}")
    try:
        with bounded_http(_REQUEST_TIMEOUT_SECONDS):
            run_id = _log(target, name, files, metric_values, param_values)
    except Exception as err:  # the store's problem: the report is on disk already
        log.warning("MLflow at %s: report '%s' not logged (%s: %s); the files stay on disk",
                    target.tracking_uri, name, type(err).__name__, err)
        print(f"MLflow: report not logged ({type(err).__name__}: {err})", flush=True)
        return None
    print(f"MLflow: logged '{name}' into run {run_id} at {target.tracking_uri}", flush=True)
    return run_id


def _log(target: MlflowTarget, name: str, files: list[Path], metrics: dict[str, float],
         params: dict[str, str]) -> str:
    from mlflow import MlflowClient  # slow to import: only when something is logged
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(tracking_uri=target.tracking_uri)
    if target.run_id is not None:
        run_id, artifact_dir, prefix = target.run_id, f"eval/{name}", f"{name}/"
        client.get_run(run_id)  # a wrong id fails here, before anything is written
        tags = [RunTag(check_key("tag", f"{name}.{k}"), v) for k, v in params.items()]
        params_rows = []
    else:
        experiment_id = ensure_experiment(client, target.experiment, artifact_location(target.tracking_uri),
                                       target.tracking_uri)
        run = client.create_run(experiment_id, run_name=name, tags={
            "tga.tool": name, "tga.model": target.model_name, "git_commit": git_commit()})
        run_id, artifact_dir, prefix = run.info.run_id, None, ""
        tags, params_rows = [], [Param(k, v) for k, v in sorted(params.items())]
    stamp = int(time.time() * 1000)
    rows = [Metric(prefix + k, v, stamp, 0) for k, v in metrics.items()]
    client.log_batch(run_id, metrics=rows, params=params_rows, tags=tags, synchronous=True)
    for path in files:
        client.log_artifact(run_id, str(path), artifact_dir)
    if artifact_dir is not None:
        with tempfile.TemporaryDirectory() as tmp:  # the params of this report, kept with its files
            staged = Path(tmp) / "params.json"
            staged.write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
            client.log_artifact(run_id, str(staged), artifact_dir)
    else:
        client.set_terminated(run_id, "FINISHED")
    return run_id


def artifact_location(uri: str) -> str | None:
    """Artifacts next to a local sqlite store (MLflow's default is relative to the working directory)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None
