"""MLflow record of an ablation suite: one parent run, one child run per ablation.

The parent carries the suite's files (results.json, results.md, results.png) and its params (the
ablations, the seeds, the command); each child (tag `mlflow.parentRunId`, so the MLflow UI nests
it) carries its ablation's headline numbers as metrics: the means over seeds, their spread
(`seed_std/<key>`), the per-layer cosine (`cos_layer/<l>`) and every seed's values
(`seed_<N>/<key>`). MLflow is reached through `MlflowClient` with explicit run ids, every call
bounded; a store that cannot be reached is a warning, as the files are on disk already.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.eval.ablation_results import HEADLINE
from pipeline.mlflow_client import git_commit, log_files, log_values, param_strings, send_or_warn, tool_experiment

DEFAULT_EXPERIMENT = "tga-ablations"


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
    parent_id = send_or_warn(tracking_uri, "ablation suite", lambda client: _log(
        client, tracking_uri, experiment, results, files, seeds=seeds, command=command))
    if parent_id is not None:
        print(f"MLflow: suite logged as run {parent_id} (experiment '{experiment}') at {tracking_uri}", flush=True)
    return parent_id


def _log(client, tracking_uri: str, experiment: str, results: dict, files: list[Path], *, seeds: list[int],
         command: str) -> str:
    experiment_id = tool_experiment(client, tracking_uri, experiment)
    shown_seeds, commit = " ".join(map(str, seeds)), git_commit()
    parent_id = client.create_run(experiment_id, run_name="ablations", tags={"git_commit": commit}).info.run_id
    log_values(client, parent_id, params=param_strings(
        {"ablations": " ".join(results), "seeds": shown_seeds, "command": command}))
    for name, entry in results.items():
        child_id = client.create_run(experiment_id, run_name=name, tags={
            "mlflow.parentRunId": parent_id, "tga.ablation": name, "git_commit": commit}).info.run_id
        log_values(client, child_id, metrics=child_metrics(entry),
                   params=param_strings({"ablation": name, "seeds": shown_seeds}))
        client.set_terminated(child_id, "FINISHED")
    log_files(client, parent_id, files)
    client.set_terminated(parent_id, "FINISHED")
    return parent_id
