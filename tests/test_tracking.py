"""The MLflow seam: one run per job on rank 0, resumable, and never a reason for training to stop.

Real MLflow throughout: the embedded sqlite store in a run folder and a real `mlflow server` on
127.0.0.1 (one per module; the outage test kills it and brings it back). A new sqlite store costs
~10 s of MLflow schema migration on 2 cores, so it is paid once: the embedded run's store, created
from nothing exactly as `make demo` does, is copied to seed the server's backend store.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import ConfigError, dump_yaml, load_config
from pipeline.mlflow_client import PARAM_VALUE_MAX_CHARS, git_commit
from pipeline.train.plots import layer_cosine_figure, save_png
from pipeline.train import tracking
from pipeline.train.tracking import Tracker, TrackingConfig
from tests.mlflow_server import free_port, mlflow_server

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
    assert tracker.ui_command == f"mlflow ui --backend-store-uri {store_uri}"
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
    assert not (tmp_path / "run").exists(), "a server-backed run must not create a local store"


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
    rejections = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejections) == 1 and tracker.rejected_calls == 3 and tracker.dropped_metrics == 6
    tracker.close()


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


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()

    def advance(self, seconds: float) -> None:
        self.now += seconds


def frozen_tracker_clock(monkeypatch) -> FakeClock:
    """The tracker's clock stands still until the test advances it: what it does while a server is
    away is then a matter of calls, not of how fast this machine runs them."""
    clock = FakeClock()
    monkeypatch.setattr(tracking, "time", clock)
    return clock


@pytest.mark.slow
def test_hung_server_stalls_one_step_by_one_timeout_and_buffered_metrics_arrive_when_it_answers(
        live_server, tmp_path, caplog, monkeypatch):
    cfg = TrackingConfig(tracking_uri=live_server.uri, experiment="hung", request_timeout_seconds=1,
                         retry_interval_seconds=2.0)
    tracker = Tracker.open(cfg, tmp_path, is_main=True, run_id=None, params=PARAMS, tags={})
    tracker.log_metrics({"loss": 1.0}, step=1)
    clock = frozen_tracker_clock(monkeypatch)  # the retry interval passes when the test says so
    live_server.pause()
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.train.tracking"):
            for step in range(2, 8):
                tracker.log_metrics({"loss": float(step)}, step=step)
    finally:
        live_server.resume()
    # one request ran into the timeout; the next five steps did not wait on the server at all
    assert tracker.failed_calls == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and live_server.uri in warnings[0], warnings
    clock.advance(cfg.retry_interval_seconds)
    tracker.log_metrics({"loss": 8.0}, step=8)
    tracker.close()

    client = MlflowClient(live_server.uri)
    run = only_run(client, "hung")
    # The request that timed out may still have been applied once the server woke up: metrics are
    # delivered at least once, so the test compares the set of steps.
    assert set(steps_of(client, run.info.run_id, "loss")) == set(range(1, 9))
    assert run.info.status == "FINISHED" and tracker.dropped_metrics == 0


# Last in the file on purpose: it leaves the module's server dead (live_server restarts it for any
# test selected after it, at ~10 s).
@pytest.mark.slow
def test_killed_server_costs_no_training_time_warns_once_and_raises_nothing(live_server, tmp_path, caplog,
                                                                            monkeypatch):
    cfg = TrackingConfig(tracking_uri=live_server.uri, experiment="killed")
    tracker = Tracker.open(cfg, tmp_path, is_main=True, run_id=None, params=PARAMS, tags={})
    tracker.log_metrics({"loss": 1.0}, step=1)
    note = text_file(tmp_path / "outage.txt", "lost while down")
    plot = save_png(cosine_figure(), tmp_path / "lost.png")
    frozen_tracker_clock(monkeypatch)  # no retry interval passes, however slow the machine
    live_server.kill()
    with caplog.at_level(logging.WARNING, logger="pipeline.train.tracking"):
        for step in range(2, 8):
            tracker.log_metrics({"loss": float(step)}, step=step)
        tracker.log_artifact(note, "notes")
        tracker.log_artifact(plot, "plots")
        # one refused connection; the later 5 steps and 2 artifacts did not call the server
        assert tracker.failed_calls == 1
        tracker.close()
    assert tracker.failed_calls == 2  # close() tries once more, whatever the retry pause says
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert live_server.uri in messages[0], messages
    assert len(messages) == 2 and "were not logged" in messages[1], messages  # outage + summary at close
    assert tracker.dropped_artifacts == 2 and tracker.dropped_metrics == 6
