"""MLflow record of an ablation suite: one parent run, one child run per ablation.

The parent carries the suite's files (results.json, results.md, results.png) and its params (the
ablations, the seeds, the command); each child (tag `mlflow.parentRunId`, so the MLflow UI nests
it) carries its ablation's headline numbers as metrics: the means over seeds, their spread
(`seed_std/<key>`), the per-layer cosine (`cos_layer/<l>`) and every seed's values
(`seed_<N>/<key>`). MLflow is reached through `MlflowClient` with explicit run ids, every call
bounded; a store that cannot be reached is a warning, as the files are on disk already.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline.analysis.report import artifact_location
from pipeline.eval.ablation_results import HEADLINE
from pipeline.train.tracking import bounded_http, ensure_experiment, git_commit, param_strings

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "tga-ablations"
_REQUEST_TIMEOUT_SECONDS = 10


def default_tracking_uri(out: Path) -> str:
    """A sqlite store in the suite's output folder (absolute, so `mlflow ui` works from anywhere)."""
    return f"sqlite:///{(Path(out).resolve() / 'mlflow.db').as_posix()}"


def child_metrics(entry: dict) -> dict[str, float]:
    """An ablation's results.json entry as flat MLflow metrics (None values left out)."""
    metrics = {key: entry[key] for key in HEADLINE}
    metrics.update({f"seed_std/{key}": value for key, value in entry["seed_std"].items()})
    metrics.update({f"cos_layer/{layer}": value for layer, value in entry["per_layer_cos"].items()})
    for seed in entry["seeds"]:
        metrics.update({f"seed_{seed['seed']}/{key}": seed[key] for key in HEADLINE})
    return {key: float(value) for key, value in metrics.items() if value is not None}


def log_suite(tracking_uri: str, experiment: str, results: dict, files: list[Path], *, seeds: list[int],
              command: str) -> str | None:
    """Log the suite; returns the parent run id, or None when the store could not be reached."""
    try:
        with bounded_http(_REQUEST_TIMEOUT_SECONDS):
            parent_id = _log(tracking_uri, experiment, results, files, seeds=seeds, command=command)
    except Exception as err:  # the store's problem: the results are on disk already
        log.warning("MLflow at %s: ablation suite not logged (%s: %s); the files stay on disk",
                    tracking_uri, type(err).__name__, err)
        print(f"MLflow: suite not logged ({type(err).__name__}: {err}); results are on disk", flush=True)
        return None
    print(f"MLflow: suite logged as run {parent_id} (experiment '{experiment}') at {tracking_uri}", flush=True)
    return parent_id


def _log(tracking_uri: str, experiment: str, results: dict, files: list[Path], *, seeds: list[int],
         command: str) -> str:
    from mlflow import MlflowClient  # slow to import: only when something is logged
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = ensure_experiment(client, experiment, artifact_location(tracking_uri), tracking_uri)
    shown_seeds, commit = " ".join(map(str, seeds)), git_commit()
    parent = client.create_run(experiment_id, run_name="ablations", tags={"git_commit": commit})
    parent_id = parent.info.run_id
    params = param_strings({"ablations": " ".join(results), "seeds": shown_seeds, "command": command})
    client.log_batch(parent_id, params=[Param(k, v) for k, v in params.items()], synchronous=True)
    stamp = int(time.time() * 1000)
    for name, entry in results.items():
        child = client.create_run(experiment_id, run_name=name, tags={
            "mlflow.parentRunId": parent_id, "tga.ablation": name, "git_commit": commit})
        metrics = [Metric(k, v, stamp, 0) for k, v in child_metrics(entry).items()]
        child_params = [Param(k, v) for k, v in param_strings({"ablation": name, "seeds": shown_seeds}).items()]
        client.log_batch(child.info.run_id, metrics=metrics, params=child_params, synchronous=True)
        client.set_terminated(child.info.run_id, "FINISHED")
    for path in files:
        client.log_artifact(parent_id, str(path))
    client.set_terminated(parent_id, "FINISHED")
    return parent_id
