"""What a run folder owes its MLflow run, and `python -m pipeline.train.tracking sync` when no server
answers. The outage with a real server (killed across the end of a run, then synced and resumed) is
in tests/test_tracking.py, which shares that module's server.
"""
from __future__ import annotations

import json
import os
import threading

import pytest

from pipeline.mlflow_client import MAX_METRICS_PER_BATCH, bounded_http
from pipeline.train import tracking
from pipeline.train.run_folder import RunFolder
from pipeline.train.tracking import Tracker, TrackingConfig
from pipeline.train.tracking_outbox import Outbox, OutboxError, step_batches, unsent_metrics
from tests.mlflow_server import free_port

RUN_ID = "0123456789abcdef0123456789abcdef"


def test_sync_while_the_server_is_still_down_exits_1_with_one_line_and_keeps_what_is_owed(tmp_path, capfd):
    uri = f"http://127.0.0.1:{free_port()}"
    run = RunFolder(tmp_path / "run")
    # a job resumed at step 2 while its server is away: it still records what the run lacks
    tracker = Tracker.open(TrackingConfig(tracking_uri=uri, request_timeout_seconds=1), run.path, is_main=True,
                           run_id=RUN_ID, resume_step=2, params={}, tags={})
    assert not tracker.active and tracker.run_id == RUN_ID
    for step in (3, 4, 5):
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
        run.append_metrics(step, {"loss": 1.0 / step})
    run.config.write_text("x: 1\n")
    tracker.log_artifact(run.config)
    tracker.close("KILLED")
    assert f"python -m pipeline.train.tracking sync {run.path.resolve()}" in capfd.readouterr().out
    owed = run.outbox.read_text()

    # in this process (mlflow is imported already); capfd sees every write to the two streams, MLflow's too
    code = tracking.main(["sync", str(run.path), "--request-timeout-seconds", "1"])
    out, err = capfd.readouterr()
    assert code == 1 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"sync: MLflow at {uri} did not take run {RUN_ID}'s backlog (")
    assert "Connection refused" in err, "the cause survives the cut to one line"
    assert err.endswith("still owed: 3 metric steps, 1 artifact, end status KILLED; run sync again when it answers\n")
    assert run.outbox.read_text() == owed and json.loads(owed)["sent_through_step"] == 2


def test_sync_of_a_folder_that_records_no_run_exits_1_naming_the_missing_file(tmp_path, capsys):
    assert tracking.main(["sync", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == f"sync: {tmp_path / 'mlflow_run.json'} not found: nothing in {tmp_path} says what an MLflow " \
                  "run lacks (tracking was off, the store was down when the job started, or the job predates sync)\n"


def test_a_resumed_run_owes_only_up_to_its_checkpoint_and_not_its_old_end_status(tmp_path):
    run = RunFolder(tmp_path).create()
    old = Outbox.for_run(run, resume_step=0, same_run=False)
    old.metrics_sent(7)
    plot = old.add_artifact(tmp_path / "plots" / "a.png", "plots")
    old.add_artifact(tmp_path / "plots" / "a.png", "plots")  # logged twice before it went: one upload
    old.end_pending("KILLED")

    resumed = Outbox.for_run(run, resume_step=5, same_run=True)
    assert (resumed.sent_through_step, resumed.pending_artifacts, resumed.end_status) == (5, [plot], None)
    assert plot == ("plots/a.png", "plots"), "kept relative to the run folder, so a copied folder syncs"
    assert resumed.describe() == "metrics after step 5, 1 artifact"
    fresh = Outbox.for_run(run, resume_step=5, same_run=False)  # the store lost the run: a new one
    assert (fresh.sent_through_step, fresh.pending_artifacts) == (5, [])
    assert Outbox.load(run).sent_through_step == 5


def test_unsent_metrics_skip_a_last_line_cut_short_and_name_a_bad_line_in_the_middle(tmp_path):
    run = RunFolder(tmp_path)
    for step in (1, 2, 3, 4):
        run.append_metrics(step, {"loss": float(step), "lr": 0.1})
    with run.metrics.open("a") as f:
        f.write('{"step": 5, "lo')  # the process died mid-write
    assert [step for step, _ in unsent_metrics(run, after_step=1, through_step=3)] == [2, 3]
    assert unsent_metrics(run, after_step=3) == [(4, {"loss": 4.0, "lr": 0.1})]
    run.metrics.write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 3, "loss": 3.0}\n')
    with pytest.raises(OutboxError, match=r"metrics.jsonl:2: not a JSON line"):
        unsent_metrics(run, after_step=0)


def test_step_batches_keep_steps_whole_and_mark_a_step_larger_than_a_batch_on_its_last_chunk():
    third = MAX_METRICS_PER_BATCH // 3 + 1
    steps = [(1, ["a"] * third), (2, ["b"] * third), (3, ["c"] * third), (4, ["d"] * (MAX_METRICS_PER_BATCH + 5))]
    batches = list(step_batches(steps))
    # step 4 alone exceeds a batch: only its last chunk's acknowledgement marks it sent
    assert [(len(rows), through) for rows, through in batches] == [
        (2 * third, 2), (third, 3), (MAX_METRICS_PER_BATCH, None), (5, 4)]
    assert batches[1][0] == ["c"] * third and batches[3][0] == ["d"] * 5


def test_overlapping_bounded_calls_restore_mlflows_settings_only_when_the_last_one_ends(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    inside, leave = threading.Event(), threading.Event()

    def sender_call():
        with bounded_http(5):
            inside.set()
            leave.wait(timeout=60)

    sender = threading.Thread(target=sender_call)
    sender.start()
    assert inside.wait(timeout=60)
    with bounded_http(10):
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "10"  # the longest bound asked for holds
    # the other thread's call is still running: it keeps its bounds, not MLflow's defaults
    assert (os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"], os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) == ("5", "0")
    leave.set()
    sender.join(timeout=60)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "120" and "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
