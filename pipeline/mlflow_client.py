"""MLflow helpers shared by the training run's tracker and the analysis and evaluation tools: names
MLflow accepts, params as strings, bounded HTTP calls, where a local store and its artifacts live, the
experiment to write into, and the one-shot logging of a tool's results that must never fail the tool.
"""
from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

# A config value longer than this is cut (the loop logs the full resolved config as an artifact).
# Current MLflow accepts 6000 characters, older servers only 500: this works with both.
PARAM_VALUE_MAX_CHARS = 500
_KEY_CHARS = re.compile(r"^[\w./\- ]+$")  # MLflow's allowed name characters (colon left out: Windows)
_KEY_MAX_CHARS = 250
# MLflow's limits per log_batch call
MAX_PARAMS_PER_BATCH = 100  # params, and tags
MAX_METRICS_PER_BATCH = 1000
# A tool logs a handful of rows once, after its results are written: it can wait longer than a training step.
TOOL_REQUEST_TIMEOUT_SECONDS = 10

_T = TypeVar("_T")


def embedded_tracking_uri(folder: str | Path) -> str:
    """A sqlite store inside `folder`: `sqlite:///<abs folder>/mlflow.db` (absolute, so `mlflow ui`
    works from anywhere). The default store of a training run and of an ablation suite."""
    return f"sqlite:///{(Path(folder).resolve() / 'mlflow.db').as_posix()}"


def artifact_location(uri: str) -> str | None:
    """Artifacts next to a local sqlite store (MLflow's default is relative to the working directory)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def relocate_store(uri: str) -> int:
    """Re-root a local sqlite store's artifact paths at its own folder: MLflow records them
    absolute (`file:///<folder>/mlartifacts/...`), so a run folder copied or moved (scratch →
    project storage) would otherwise keep writing artifacts into its old place. Paths into another
    folder's `mlartifacts` become the same paths under this one's; anything else (a server, an
    artifact store elsewhere) is left alone. Returns the rows changed; run before MLflow opens the store."""
    if not uri.startswith("sqlite:///"):
        return 0
    database = Path(uri.removeprefix("sqlite:///"))
    if not database.is_file():
        return 0
    here = artifact_location(uri)
    changed = 0
    with contextlib.closing(sqlite3.connect(database)) as db:
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
            try:
                values = [row[0] for row in db.execute(f"SELECT DISTINCT {column} FROM {table}")]
            except sqlite3.OperationalError:  # not an MLflow store (yet)
                return changed
            for value in values:
                old_root, found, rest = (value or "").partition("/mlartifacts")
                if found and value.startswith("file://") and old_root + found != here:
                    changed += db.execute(f"UPDATE {table} SET {column} = ? WHERE {column} = ?",
                                          (here + rest, value)).rowcount
        db.commit()
    if changed:
        log.info("%s: artifact paths of %d experiment/run rows moved under %s", database, changed, here)
    return changed


def git_commit(path: str | Path | None = None) -> str:
    """Short hash of the checkout holding `path` (default: this code), or "unknown" — never raises."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def check_key(kind: str, key: str) -> str:
    """A name MLflow accepts on every platform and store, or ValueError naming it."""
    if (not isinstance(key, str) or len(key) > _KEY_MAX_CHARS or not _KEY_CHARS.match(key)
            or posixpath.normpath(key) != key or key.startswith(("/", ".."))):
        raise ValueError(f"{kind} name {key!r} is not a valid MLflow key: use at most {_KEY_MAX_CHARS} "
                         "letters, digits, '_', '-', '.', '/' or spaces, with no leading '/' or '..' and "
                         "no '//' (e.g. 'cos_layer/10')")
    return key


def param_strings(params: Mapping[str, Any]) -> dict[str, str]:
    """Nested or dotted config → `{"train.lr": "0.001"}`, values cut to PARAM_VALUE_MAX_CHARS."""
    out: dict[str, str] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                walk(value, name + ".")
                continue
            text = str(value)
            if len(text) > PARAM_VALUE_MAX_CHARS:
                log.info("param %s has %d characters: logged cut to %d",
                         name, len(text), PARAM_VALUE_MAX_CHARS)
                text = text[: PARAM_VALUE_MAX_CHARS - 3] + "..."
            out[check_key("param", name)] = text

    walk(params, "")
    return out


_HTTP_KNOBS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
_bounds_lock = threading.Lock()
_bounds_in_flight: list[int] = []  # the timeout of every bounded block now running, in any thread
_bounds_saved: dict[str, str | None] = {}


@contextlib.contextmanager
def bounded_http(timeout_seconds: int) -> Iterator[None]:
    """MLflow's HTTP defaults (7 retries with exponential backoff, 120 s timeout) make one call to a
    dead server block for minutes: right for a notebook, wrong for a tracker whose queue waits behind
    it. MLflow reads these knobs from the environment at every request, so they are set only around
    our own calls and restored after: the rest of the process keeps MLflow's defaults. The environment
    is process-wide and the tracker calls from its own thread, so blocks may overlap: the first one in
    saves MLflow's values, the last one out restores them, and the longest timeout asked for holds
    meanwhile. The tracker's retry is its queue re-sent later, not a blocking loop."""
    with _bounds_lock:
        if not _bounds_in_flight:
            _bounds_saved.update({name: os.environ.get(name) for name in _HTTP_KNOBS})
        _bounds_in_flight.append(timeout_seconds)
        _set_bounds(max(_bounds_in_flight))
    try:
        yield
    finally:
        with _bounds_lock:
            _bounds_in_flight.remove(timeout_seconds)
            if _bounds_in_flight:
                _set_bounds(max(_bounds_in_flight))
            else:
                for name, value in _bounds_saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value


def _set_bounds(timeout_seconds: int) -> None:
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout_seconds)


def error_line(err: Exception, max_chars: int = 300) -> str:
    """`Type: message` on one line, at most `max_chars`: a refused connection's MLflow error carries
    urllib3's whole retry history, with the URL first and the cause ("Connection refused") last, so
    the middle is what is cut."""
    text = f"{type(err).__name__}: {' '.join(str(err).split())}"
    if len(text) <= max_chars:
        return text
    half = (max_chars - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"


def error_code(err: Exception) -> str | None:
    """The store's error code of an MLflow failure ("RESOURCE_DOES_NOT_EXIST", ...); None for others."""
    return getattr(err, "error_code", None)


def ensure_experiment(client, name: str, artifact_location: str | None, uri: str) -> str:
    """The id of experiment `name`, created (with `artifact_location`) if missing."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as err:  # another job created it between our two calls
            if error_code(err) != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise RuntimeError(f"experiment {name!r} is deleted in {uri}: restore it "
                           f"(`mlflow experiments restore`) or set tracking.experiment to another name")
    return experiment.experiment_id


# -- one-shot logging of a tool's results -----------------------------------------------------------

def send_or_warn(tracking_uri: str, what: str, send: Callable[[Any], _T]) -> _T | None:
    """`send(client)` with an `MlflowClient` of `tracking_uri`, every request bounded → what it returns.

    A tool calls this after its results are on disk, so a store that fails is a warning naming `what`
    and None, never an error that would hide the results.
    """
    try:
        with bounded_http(TOOL_REQUEST_TIMEOUT_SECONDS):
            from mlflow import MlflowClient  # slow to import: only when something is logged

            relocate_store(tracking_uri)
            return send(MlflowClient(tracking_uri=tracking_uri))
    except Exception as err:  # the store's problem: the results are on disk already
        log.warning("MLflow at %s: %s not logged (%s: %s); the files stay on disk",
                    tracking_uri, what, type(err).__name__, err)
        print(f"MLflow: {what} not logged ({type(err).__name__}: {err}); results are on disk", flush=True)
        return None


def tool_experiment(client, tracking_uri: str, name: str) -> str:
    """The id of a tool's experiment `name`, created if missing (artifacts next to a sqlite store)."""
    return ensure_experiment(client, name, artifact_location(tracking_uri), tracking_uri)


def log_values(client, run_id: str, *, metrics: Mapping[str, float] | None = None,
               params: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None) -> None:
    """Write `metrics` (stamped now, step 0), `params` and `tags` in one synchronous batch.

    One batch holds at most 100 params and 1000 rows in all: a tool's summary, not a training config.
    """
    from mlflow.entities import Metric, Param, RunTag

    stamp = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, stamp, 0) for k, v in (metrics or {}).items()],
                     params=[Param(k, v) for k, v in sorted((params or {}).items())],
                     tags=[RunTag(k, v) for k, v in (tags or {}).items()], synchronous=True)


def log_files(client, run_id: str, files: list[Path], artifact_dir: str | None = None) -> None:
    """Copy each file into the run's artifacts (under `artifact_dir`)."""
    for path in files:
        client.log_artifact(run_id, str(path), artifact_dir)
