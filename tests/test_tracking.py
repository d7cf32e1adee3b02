"""The MLflow seam: one run per job on rank 0, resumable, and never a reason for training to stop.

Real MLflow throughout: the embedded sqlite store in a run folder and a real `mlflow server` on
127.0.0.1 (one per module; the outage test kills it and brings it back). A new sqlite store costs
~10 s of MLflow schema migration on 2 cores, so it is paid once: the embedded run's store, created
from nothing exactly as `make demo` does, is copied to seed the server's backend store.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import ConfigError, dump_yaml, load_config
from pipeline.mlflow_client import PARAM_VALUE_MAX_CHARS, git_commit
from pipeline.train.plots import layer_cosine_figure, save_png
from pipeline.train import tracking
from pipeline.train.run_folder import RunFolder
from pipeline.train.tracking import Tracker, TrackingConfig
from tests.mlflow_server import free_port, mlflow_server
from tests.stage_runner import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PARAMS = {"train": {"lr": 1e-3, "alignment_layers": [10, 20]}, "data": {"shards": "shards/"}}


def only_run(client: MlflowClient, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, f"expected one run in {experiment}, found {len(runs)}"
    return runs[0]


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def cosine_figure():
    history = [(1, {10: 0.2, 20: 0.4}), (2, {10: 0.31, 20: 0.52})]
    return layer_cosine_figure(history[-1][1], step=2, history=history)


def text_file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    """A job with the default config: the store is created inside a run folder that does not exist yet."""
    root = tmp_path_factory.mktemp("embedded")
    run_dir = root / "runs" / "demo"
    tracker = Tracker.open(TrackingConfig(), run_dir, is_main=True, run_id=None, params=PARAMS,
                           tags={"stage": "stage1", "world_size": 2})
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": 1.0 / step, "cos_layer/10": 0.1 * step}, step=step)
    tracker.log_artifact(text_file(root / "files" / "resolved.yaml", "train:\n  lr: 0.001\n"), "config")
    tracker.log_artifact(save_png(cosine_figure(), root / "files" / "alignment_step000003.png"), "plots")
    tracker.close()
    return run_dir, tracker


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded_run):
    root = tmp_path_factory.mktemp("mlflow-server")
    shutil.copyfile(embedded_run[0] / "mlflow.db", root / "mlflow.db")  # already migrated
    with mlflow_server(root) as running:
        yield running


@pytest.fixture
def live_server(server):
    """The module's server, restarted (same port and store) if an earlier test killed it."""
    return server.start()


@pytest.mark.slow
def test_embedded_default_store_lives_in_the_run_folder_with_one_complete_run(embedded_run):
    run_dir, tracker = embedded_run
    store_uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    assert tracker.ui_command == f"{sys.executable} -m mlflow ui --backend-store-uri {store_uri}"
    client = MlflowClient(store_uri)
    run = only_run(client, "tga")
    assert run.info.run_id == tracker.run_id and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.001"
    assert run.data.params["train.alignment_layers"] == "[10, 20]"
    assert run.data.tags["stage"] == "stage1" and run.data.tags["world_size"] == "2"
    assert run.data.tags["git_commit"] == git_commit()
    assert steps_of(client, run.info.run_id, "cos_layer/10") == [1, 2, 3]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0, 0.5, 1.0 / 3]
    stored = run_dir / "mlartifacts" / run.info.run_id / "artifacts"
    assert (stored / "config" / "resolved.yaml").read_text() == "train:\n  lr: 0.001\n"
    assert (stored / "plots" / "alignment_step000003.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.slow
def test_server_run_receives_params_metrics_png_and_resolved_config(live_server, tmp_path):
    cfg = TrackingConfig(tracking_uri=live_server.uri, experiment="server-run", run_name="demo")
    resolved = tmp_path / "resolved.yaml"
    dump_yaml(cfg, resolved)
    plot = save_png(cosine_figure(), tmp_path / "plots" / "alignment_step000004.png")
    with Tracker.open(cfg, tmp_path / "run", is_main=True, run_id=None, params=PARAMS,
                      tags={"stage": "stage1", "world_size": 1}) as tracker:
        for step in range(1, 5):
            tracker.log_metrics({"loss/lm": 2.0 - 0.1 * step, "cos_layer/20": 0.2 * step}, step=step)
        tracker.log_artifact(resolved, "config")
        tracker.log_artifact(plot, "plots")

    assert tracker.ui_command is None
    assert tracker.run_url.startswith(f"{live_server.uri}/#/experiments/")
    assert tracker.run_url.endswith(f"/runs/{tracker.run_id}")
    client = MlflowClient(live_server.uri)
    run = only_run(client, "server-run")
    assert run.info.run_name == "demo" and run.info.status == "FINISHED"
    assert run.data.params["data.shards"] == "shards/"
    assert steps_of(client, run.info.run_id, "loss/lm") == [1, 2, 3, 4]
    assert steps_of(client, run.info.run_id, "cos_layer/20") == [1, 2, 3, 4]
    fetched = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "fetched")))
    assert (fetched / "config" / "resolved.yaml").read_text() == resolved.read_text()
    assert (fetched / "plots" / "alignment_step000004.png").read_bytes() == plot.read_bytes()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["mlflow_outbox.json", "mlflow_run.json"], \
        "a server-backed run keeps only its tracking record locally, no store"


@pytest.mark.slow
def test_reopening_with_the_stored_run_id_appends_to_the_same_run(live_server, tmp_path):
    cfg = TrackingConfig(tracking_uri=live_server.uri, experiment="resume")
    first = Tracker.open(cfg, tmp_path, is_main=True, run_id=None, params=PARAMS, tags={"stage": "stage1"})
    for step in (1, 2, 3):
        first.log_metrics({"loss": float(step)}, step=step)
    first.close("KILLED")  # preempted; the checkpoint kept first.run_id

    resumed = Tracker.open(cfg, tmp_path, is_main=True, run_id=first.run_id, params=PARAMS,
                           tags={"stage": "stage1", "world_size": 4})
    assert resumed.run_id == first.run_id
    for step in (4, 5, 6):
        resumed.log_metrics({"loss": float(step)}, step=step)
    resumed.close()

    client = MlflowClient(live_server.uri)
    run = only_run(client, "resume")
    assert steps_of(client, run.info.run_id, "loss") == [1, 2, 3, 4, 5, 6]
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "4"
    assert run.data.params["train.lr"] == "0.001"


@pytest.mark.slow
def test_resuming_a_run_the_store_does_not_have_starts_a_new_run_tagged_with_the_old_id(
        live_server, tmp_path, caplog):
    cfg = TrackingConfig(tracking_uri=live_server.uri, experiment="lost-run")
    with caplog.at_level(logging.WARNING, logger="pipeline.train.tracking"):
        tracker = Tracker.open(cfg, tmp_path, is_main=True, run_id="0" * 32, params=PARAMS, tags={})
    tracker.close()
    assert tracker.run_id != "0" * 32 and any("0" * 32 in r.getMessage() for r in caplog.records)
    run = only_run(MlflowClient(live_server.uri), "lost-run")
    assert run.data.tags["resumed_from_run_id"] == "0" * 32 and run.data.params["train.lr"] == "0.001"


@pytest.mark.slow
def test_run_deleted_during_training_drops_its_metrics_with_one_warning(live_server, tmp_path, caplog):
    cfg = TrackingConfig(tracking_uri=live_server.uri, experiment="deleted-run")
    tracker = Tracker.open(cfg, tmp_path, is_main=True, params=PARAMS, tags={})
    MlflowClient(live_server.uri).delete_run(tracker.run_id)
    with caplog.at_level(logging.WARNING, logger="pipeline.train.tracking"):
        for step in (1, 2, 3):
            tracker.log_metrics({"loss": 1.0, "lr": 1e-4}, step=step)
        tracker.close()
    rejections = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejections) == 1 and tracker.rejected_calls >= 1 and tracker.dropped_metrics == 6


@pytest.mark.slow
def test_only_the_main_rank_creates_a_run_or_any_file(live_server, tmp_path):
    cfg = TrackingConfig(tracking_uri=live_server.uri, experiment="two-ranks")
    rank0 = Tracker.open(cfg, tmp_path, is_main=True, run_id=None, params=PARAMS, tags={})
    rank1 = Tracker.open(cfg, tmp_path, is_main=False, run_id=None, params=PARAMS, tags={})
    note = text_file(tmp_path / "rank.txt", "x")
    for tracker in (rank0, rank1):
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_artifact(note, "notes")
    rank1.log_artifact(tmp_path / "drawn-on-rank0-only.png", "plots")  # no file needed off rank 0
    rank0.close()
    rank1.close()
    assert rank1.run_id is None and not rank1.active and rank1.ui_command is None
    assert only_run(MlflowClient(live_server.uri), "two-ranks").info.run_id == rank0.run_id

    embedded_rank1 = Tracker.open(TrackingConfig(), tmp_path / "run", is_main=False, run_id=None,
                                  params=PARAMS, tags={})
    embedded_rank1.log_metrics({"loss": 1.0}, step=1)
    embedded_rank1.close()
    assert not (tmp_path / "run").exists()


def test_server_down_at_start_gives_a_quiet_tracker_that_keeps_the_run_id(tmp_path, caplog):
    cfg = TrackingConfig(tracking_uri=f"http://127.0.0.1:{free_port()}", experiment="nobody-listens")
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pipeline.train.tracking"):
        tracker = Tracker.open(cfg, tmp_path, is_main=True, run_id="0123456789abcdef", params=PARAMS, tags={})
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.close()
    # far below what MLflow's default retries with backoff take against a closed port (minutes)
    assert time.monotonic() - began < 60.0
    assert not tracker.active and tracker.run_id == "0123456789abcdef"
    assert any(cfg.tracking_uri in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_long_param_value_is_truncated_rather_than_failing_the_run(live_server, tmp_path):
    cfg = TrackingConfig(tracking_uri=live_server.uri, experiment="long-param")
    params = {"data": {"sources": ",".join(f"shard-{i:06d}.tar" for i in range(400))}}
    params.update({f"many.key_{i:03d}": i for i in range(150)})  # more than one 100-param batch
    with Tracker.open(cfg, tmp_path, is_main=True, run_id=None, params=params, tags={}) as tracker:
        tracker.log_metrics({"loss": 1.0}, step=1)
    run = only_run(MlflowClient(live_server.uri), "long-param")
    stored = run.data.params["data.sources"]
    assert len(stored) == PARAM_VALUE_MAX_CHARS and stored.endswith("...")
    assert stored[:-3] == params["data"]["sources"][: PARAM_VALUE_MAX_CHARS - 3]
    assert len(run.data.params) == 151 and tracker.failed_calls == 0


def test_invalid_names_and_values_raise_on_every_rank_before_mlflow(tmp_path):
    quiet = Tracker.open(TrackingConfig(), tmp_path, is_main=False, run_id=None, params={}, tags={})
    with pytest.raises(ValueError, match="'loss!'"):
        quiet.log_metrics({"loss!": 1.0}, step=1)
    with pytest.raises(ValueError, match="'loss' at step 3"):
        quiet.log_metrics({"loss": "high"}, step=3)
    with pytest.raises(ValueError, match="'../plots'"):
        quiet.log_artifact(tmp_path / "p.png", "../plots")
    with pytest.raises(ValueError, match="'../escape'"):
        Tracker.open(TrackingConfig(), tmp_path, is_main=False, params={"../escape": 1}, tags={})
    quiet.close()
    with pytest.raises(RuntimeError, match="closed"):
        quiet.log_metrics({"loss": 1.0}, step=4)


def test_tracking_config_loads_as_a_section_and_rejects_bad_values():
    overrides = ["tracking_uri=http://mlflow.internal:5000", "plot_every_steps=10"]
    cfg = load_config(TrackingConfig, None, overrides)
    assert cfg.tracking_uri == "http://mlflow.internal:5000" and cfg.plot_due(20) and not cfg.plot_due(25)
    assert not TrackingConfig(plot_every_steps=0).plot_due(0)
    with pytest.raises(ConfigError, match="plot_every_steps"):
        load_config(TrackingConfig, None, ["plot_every_steps=-1"])


def test_layer_cosine_figure_draws_one_bar_per_layer_and_one_line_per_layer(tmp_path):
    fig = cosine_figure()
    bars_ax, lines_ax = fig.axes
    assert [p.get_height() for p in bars_ax.patches] == pytest.approx([0.31, 0.52])
    assert [line.get_label() for line in lines_ax.get_lines()] == ["layer 10", "layer 20"]
    assert list(lines_ax.get_lines()[1].get_xdata()) == [1, 2]
    assert save_png(fig, tmp_path / "a" / "b.png").read_bytes().startswith(PNG_MAGIC)
    assert len(layer_cosine_figure({5: -0.2}).axes) == 1
    with pytest.raises(ValueError, match="empty"):
        layer_cosine_figure({})


def log_step(tracker: Tracker, run_dir: Path, step: int, metrics: dict[str, float]) -> None:
    """What the loop does per logged step: the tracker queues, then metrics.jsonl gets the line."""
    tracker.log_metrics(metrics, step=step)
    RunFolder(run_dir).append_metrics(step, metrics)


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def sync_command(run_dir: Path) -> subprocess.CompletedProcess:
    """`python -m pipeline.train.tracking sync RUN_DIR` as a user runs it, from the checkout."""
    return subprocess.run([sys.executable, "-m", "pipeline.train.tracking", "sync", str(run_dir)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_log_calls_return_while_the_server_hangs_and_everything_arrives_once_it_answers(live_server, tmp_path):
    cfg = TrackingConfig(tracking_uri=live_server.uri, experiment="hung", request_timeout_seconds=120,
                         retry_interval_seconds=1.0)
    tracker = Tracker.open(cfg, tmp_path, is_main=True, run_id=None, params=PARAMS, tags={})
    tracker.log_metrics({"loss": 1.0}, step=1)
    assert tracker.drain(timeout_seconds=60)
    note = text_file(tmp_path / "hung.txt", "sent once the server wakes")
    live_server.pause()
    try:
        for step in range(2, 8):
            tracker.log_metrics({"loss": float(step)}, step=step)
        tracker.log_artifact(note, "notes")
        # every call above returned although no request can be answered: the store has none of it yet
        assert not tracker.drain(timeout_seconds=0)
    finally:
        live_server.resume()
    assert tracker.drain(timeout_seconds=120)
    tracker.close()

    client = MlflowClient(live_server.uri)
    run = only_run(client, "hung")
    assert steps_of(client, run.info.run_id, "loss") == list(range(1, 8))
    assert [a.path for a in client.list_artifacts(run.info.run_id, "notes")] == ["notes/hung.txt"]
    assert run.info.status == "FINISHED" and tracker.dropped_metrics == 0


@pytest.mark.slow
def test_a_full_queue_leaves_later_steps_to_metrics_jsonl_and_sync_sends_them(live_server, tmp_path, monkeypatch,
                                                                                capsys):
    monkeypatch.setattr(tracking, "_MAX_QUEUED_VALUES", 2)
    cfg = TrackingConfig(tracking_uri=live_server.uri, experiment="full-queue", request_timeout_seconds=120,
                         retry_interval_seconds=1.0)
    tracker = Tracker.open(cfg, tmp_path, is_main=True, run_id=None, params=PARAMS, tags={})
    live_server.pause()  # nothing leaves the queue: steps 1-2 fill it, 3-5 find it full
    try:
        for step in range(1, 6):
            log_step(tracker, tmp_path, step, {"loss": float(step)})
    finally:
        live_server.resume()
    assert tracker.drain(timeout_seconds=120)
    tracker.close()
    assert "lacks part of run" in capsys.readouterr().out
    assert steps_of(MlflowClient(live_server.uri), tracker.run_id, "loss") == [1, 2]

    assert tracking.main(["sync", str(tmp_path)]) == 0
    assert steps_of(MlflowClient(live_server.uri), tracker.run_id, "loss") == [1, 2, 3, 4, 5]


@dataclasses.dataclass
class Outage:
    finished: Path  # run folder of the job that ended while the server was dead
    resumed: Path  # run folder of the job preempted in the outage and resumed after it
    steps_before_sync: list[int]
    status_before_sync: str
    close_lines: list[str]  # what the two close() calls printed
    outage_warnings: list[str]
    first_sync: subprocess.CompletedProcess
    uri: str


@pytest.fixture(scope="module")
def outage_across_the_end(server, tmp_path_factory) -> Outage:
    """One server death across the end of two jobs. `finished` logs steps 1-3, loses the server, logs
    4-9 and a plot and closes FINISHED; `resumed` logs 1-2, loses it, logs 3-4 and closes KILLED. The
    server comes back (same port and store); `sync` runs on `finished`, and `resumed` resumes from an
    older checkpoint (step 3), so its step 4 is trained again."""
    root = tmp_path_factory.mktemp("outage")
    server.start()
    cfg = TrackingConfig(tracking_uri=server.uri, experiment="outage")  # close gives a dead server no wait
    finished, resumed = root / "finished", root / "resumed"
    a = Tracker.open(cfg, finished, is_main=True, params=PARAMS, tags={})
    b = Tracker.open(cfg, resumed, is_main=True, params=PARAMS, tags={})
    for step in (1, 2, 3):
        log_step(a, finished, step, {"loss": 1.0 / step, "cos_layer/10": 0.1 * step})
    for step in (1, 2):
        log_step(b, resumed, step, {"loss": float(step)})
    assert a.drain(timeout_seconds=60) and b.drain(timeout_seconds=60)
    server.kill()
    warnings = WarningLines()
    with warnings.capture(), contextlib.redirect_stdout(io.StringIO()) as printed:
        for step in range(4, 10):
            log_step(a, finished, step, {"loss": 1.0 / step, "cos_layer/10": 0.1 * step})
        a.log_artifact(save_png(cosine_figure(), RunFolder(finished).plot(9)), "plots")
        for step in (3, 4):
            log_step(b, resumed, step, {"loss": float(step)})
        a.close("FINISHED")
        b.close("KILLED")
    server.start()
    client = MlflowClient(server.uri)
    before = client.get_run(a.run_id).info.status, steps_of(client, a.run_id, "loss")
    first_sync = sync_command(finished)

    again = Tracker.open(cfg, resumed, is_main=True, run_id=b.run_id, resume_step=3, params=PARAMS, tags={})
    RunFolder(resumed).rewind(3, rank=0)  # as build_job does right after opening the tracker
    for step in (4, 5, 6):
        log_step(again, resumed, step, {"loss": 10.0 * step})
    again.close()
    outage_warnings = [line for line in warnings.lines if " failed (" in line]
    return Outage(finished, resumed, before[1], before[0], printed.getvalue().splitlines(), outage_warnings,
                  first_sync, server.uri)


class WarningLines(logging.Handler):
    """The tracker's warnings, from whichever thread logged them."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    @contextlib.contextmanager
    def capture(self):
        logger = logging.getLogger("pipeline.train.tracking")
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)


def tracking_record(run_dir: Path) -> dict:
    return json.loads(RunFolder(run_dir).tracking.read_text())


@pytest.mark.slow
def test_a_run_that_ended_while_the_server_was_dead_has_every_step_and_finished_after_sync(outage_across_the_end):
    outage = outage_across_the_end
    run_id = tracking_record(outage.finished)["run_id"]
    # close() could not reach the server: it said so in one line, with the command that sends the rest
    command = f"python -m pipeline.train.tracking sync {outage.finished.resolve()}"
    assert len(outage.close_lines) == 2 and all(outage.uri in line for line in outage.close_lines)
    assert command in outage.close_lines[0], outage.close_lines
    assert len(outage.outage_warnings) == 2, outage.outage_warnings  # one per tracker, not one per call
    assert outage.steps_before_sync == [1, 2, 3] and outage.status_before_sync == "RUNNING"

    assert outage.first_sync.returncode == 0, outage.first_sync.stderr
    assert outage.first_sync.stdout.splitlines() == [
        f"synced MLflow run {run_id} at {outage.uri}: 6 steps (12 values), 1 artifact, status FINISHED"]
    client = MlflowClient(outage.uri)
    lines = [json.loads(line) for line in RunFolder(outage.finished).metrics.read_text().splitlines()]
    for key in ("loss", "cos_layer/10"):
        assert history(client, run_id, key) == [(line["step"], line[key]) for line in lines], key
    assert [line["step"] for line in lines] == list(range(1, 10))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/alignment_step0000009.png"]


@pytest.mark.slow
def test_a_second_sync_sends_nothing_and_duplicates_no_point(outage_across_the_end):
    outage = outage_across_the_end
    run_id = tracking_record(outage.finished)["run_id"]
    second = sync_command(outage.finished)
    assert second.returncode == 0 and second.stdout.splitlines() == [
        f"MLflow run {run_id} at {outage.uri} already has everything {outage.finished.resolve()} holds: nothing sent"]
    client = MlflowClient(outage.uri)
    assert steps_of(client, run_id, "loss") == steps_of(client, run_id, "cos_layer/10") == list(range(1, 10))


@pytest.mark.slow
def test_a_job_resumed_after_the_outage_first_sends_what_its_last_job_left_up_to_its_checkpoint(
        outage_across_the_end):
    outage = outage_across_the_end
    run_id = tracking_record(outage.resumed)["run_id"]
    assert f"sync {outage.resumed.resolve()}" in outage.close_lines[1]
    client = MlflowClient(outage.uri)
    # steps 1-2 live, 3 from the outbox at the resume, 4-6 trained again (the lost step 4 never went)
    assert history(client, run_id, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert json.loads(RunFolder(outage.resumed).outbox.read_text()) == {
        "sent_through_step": 6, "pending_artifacts": [], "end_status": None}


@pytest.mark.slow
def test_a_moved_run_folder_keeps_its_artifacts_in_its_new_place(tmp_path):
    """scratch → project storage: the store records absolute artifact paths; a resume (and a tool)
    must write into the folder where the run lives now, never into the old place."""
    old = tmp_path / "scratch" / "run"
    tracker = Tracker.open(TrackingConfig(), old, is_main=True, run_id=None, params=PARAMS)
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_artifact(text_file(tmp_path / "files" / "a.txt", "before the move\n"), "notes")
    tracker.close()
    run_id = tracker.run_id
    new = tmp_path / "project" / "run"
    new.parent.mkdir()
    shutil.move(old, new)
    shutil.rmtree(tmp_path / "scratch")

    assert RunFolder(new).read_tracking()["tracking_uri"] == f"sqlite:///{(new / 'mlflow.db').resolve()}"
    # the resume is a new process, as after a requeue (MLflow caches a run's artifact place per process)
    resume = (f"from pathlib import Path\nfrom pipeline.train.tracking import Tracker, TrackingConfig\n"
              f"t = Tracker.open(TrackingConfig(), Path({str(new)!r}), is_main=True, run_id={run_id!r}, resume_step=1)\n"
              f"assert t.run_id == {run_id!r}\nt.log_metrics({{'loss': 0.5}}, step=2)\n"
              f"t.log_artifact(Path({str(text_file(tmp_path / 'files' / 'b.txt', 'after the move'))!r}), 'notes')\n"
              "t.close()\n")
    subprocess.run([sys.executable, "-c", resume], cwd=REPO, check=True, timeout=300)
    assert not (tmp_path / "scratch").exists(), "something was written into the old place"
    client = MlflowClient(f"sqlite:///{(new / 'mlflow.db').resolve()}")
    run = client.get_run(run_id)
    assert run.info.artifact_uri.startswith((new / "mlartifacts").resolve().as_uri())
    assert sorted(a.path for a in client.list_artifacts(run_id, "notes")) == ["notes/a.txt", "notes/b.txt"]
    assert steps_of(client, run_id, "loss") == [1, 2]
