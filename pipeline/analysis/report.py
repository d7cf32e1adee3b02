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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.mlflow_client import (
    check_key,
    git_commit,
    log_files,
    log_values,
    param_strings,
    send_or_warn,
    tool_experiment,
)

if TYPE_CHECKING:
    from pipeline.analysis.model_folder import LoadedModel

DEFAULT_EXPERIMENT = "tga-eval"


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
    run_id = send_or_warn(target.tracking_uri, f"report '{name}'",
                          lambda client: _log(client, target, name, files, metric_values, param_values))
    if run_id is not None:
        print(f"MLflow: logged '{name}' into run {run_id} at {target.tracking_uri}", flush=True)
    return run_id


def _log(client, target: MlflowTarget, name: str, files: list[Path], metrics: dict[str, float],
         params: dict[str, str]) -> str:
    if target.run_id is not None:
        _log_into_run(client, target.run_id, name, files, metrics, params)
        return target.run_id
    experiment_id = tool_experiment(client, target.tracking_uri, target.experiment)
    run = client.create_run(experiment_id, run_name=name, tags={
        "tga.tool": name, "tga.model": target.model_name, "git_commit": git_commit()})
    log_values(client, run.info.run_id, metrics=metrics, params=params)
    log_files(client, run.info.run_id, files)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _log_into_run(client, run_id: str, name: str, files: list[Path], metrics: dict[str, float],
                  params: dict[str, str]) -> None:
    """Everything under the report's own names, so it cannot clash with the training's or another tool's."""
    client.get_run(run_id)  # a wrong id fails here, before anything is written
    artifact_dir = f"eval/{name}"
    log_values(client, run_id, metrics={f"{name}/{k}": v for k, v in metrics.items()},
               tags={check_key("tag", f"{name}.{k}"): v for k, v in params.items()})
    log_files(client, run_id, files, artifact_dir)
    with tempfile.TemporaryDirectory() as tmp:  # the params of this report, kept with its files
        staged = Path(tmp) / "params.json"
        staged.write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        client.log_artifact(run_id, str(staged), artifact_dir)
