"""Shared fixtures: the tiny world (generated once per source revision), small training shards, the
tiny caption index, a tracking server, and work started in the background at collection."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.data.shards import ShardWriter, shard_name, write_manifest
from pipeline.tinyworld import ensure
from stages import caption_index
from tests.ds_toy import Scenarios
from tests.mlflow_server import mlflow_server

REPO = Path(__file__).resolve().parent.parent
# DeepSpeed's ZeRO optimizer check imports its Muon kernels, whose @torch.compile pulls in all of
# inductor (seconds per rank at every start); nothing in the tests compiles. Every process the suite
# starts (stage launches, ablation steps, Slurm jobs, benchmarks) inherits this.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def _own_extension_builds_when_run_through_a_link() -> None:
    """DeepSpeed JIT-builds its CPU ops (shared-memory all-reduce, CPU Adam) into
    TORCH_EXTENSIONS_DIR (`make env` prebuilds them per environment). The build command names the
    interpreter's prefix, and `.venv/bin/python` reaches the environment through another prefix than
    `make test` (the folder the link points to): a build for one is a rebuild, 0.5-1 min of both
    cores, for the other, so sessions of both kinds on one machine rebuilt the ops in turn at
    DeepSpeed starts. A session run through a link keeps its builds apart."""
    builds, prefix = os.environ.get("TORCH_EXTENSIONS_DIR"), Path(sys.prefix)
    if builds and prefix.resolve() != prefix:
        digest = hashlib.sha256(str(prefix).encode()).hexdigest()[:12]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(builds) / f"prefix-{digest}")


_own_extension_builds_when_run_through_a_link()


def _tinyworld_cache() -> Path:
    """Keyed by the generator's source, so a changed generator never serves a stale world."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "pipeline" / "tinyworld").glob("*.py")):
        digest.update(path.read_bytes())
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tga-pipeline" / "tinyworld"
    return root / digest.hexdigest()[:16]


# Work that tests read but that depends on nothing they do starts in the background as soon as
# collection shows that a test needs its fixture, which then waits for the result: the suite keeps
# about one core idle on average. Each job runs at the lowest priority, so it takes the cycles the
# tests leave idle rather than half of theirs: in a session of its own whose scheduling group is
# niced too (Linux shares the CPU between sessions first; a nice value ranks a process only inside
# its session).
_LOWEST_PRIORITY = """
import contextlib, os
from pathlib import Path
os.nice(19)
with contextlib.suppress(OSError):
    Path("/proc/self/autogroup").write_text("19")
"""
_BACKGROUND_JOBS = {
    # tests/test_tinyworld.py regenerates the world from scratch (~2 min of one core) to prove the
    # same seed gives the same bytes.
    "regenerated_world": """
import json, sys, time
from pathlib import Path
import torch
from pipeline.tinyworld import generate
torch.set_num_threads(1)
settings = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
start = time.perf_counter()
generate(Path(sys.argv[1]) / "tiny", seed=0)
restored = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()) == settings
Path(sys.argv[1], "generation.json").write_text(json.dumps(
    {"seconds": time.perf_counter() - start, "torch_settings_restored": restored}))
""",
    # tests/ds_toy.py's DeepSpeed launches (crash, preemption, resumes; ~1.5 min of 2 cores), which
    # tests/test_checkpoint.py and tests/test_preemption.py read.
    "toy": """
import sys
from pathlib import Path
from tests.ds_toy import toy_scenarios
toy_scenarios(Path(sys.argv[1]) / "ds_toy").save(Path(sys.argv[1]) / "scenarios.json")
""",
}
_BACKGROUND = pytest.StashKey[dict]()
_SHM_BEFORE = pytest.StashKey[set]()


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    session.config.stash[_SHM_BEFORE] = _shm_buffers()  # before any background job starts a rank
    needed = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    started = {}
    for fixture, script in _BACKGROUND_JOBS.items():
        if fixture in needed:
            folder = Path(tempfile.mkdtemp(prefix=f"background-{fixture}-"))
            log = open(folder / "job.log", "wb")
            started[fixture] = (subprocess.Popen(
                [sys.executable, "-c", _LOWEST_PRIORITY + script, str(folder)], cwd=REPO, env=env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True), folder, log)
    session.config.stash[_BACKGROUND] = started


def pytest_sessionfinish(session):
    for proc, folder, log in session.config.stash.get(_BACKGROUND, {}).values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the job and what it started
        proc.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def _background_result(request, fixture: str) -> Path:
    """The folder of `fixture`'s background job, once the job has finished."""
    started = request.config.stash.get(_BACKGROUND, {}).get(fixture)
    if started is None:
        pytest.fail(f"the background job of {fixture} was not started (pytest_collection_finish)")
    proc, folder, log = started
    if proc.poll() is None:  # a test waits for it now: back to the tests' priority where allowed
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PGRP, proc.pid, 0)
        with contextlib.suppress(OSError):
            Path(f"/proc/{proc.pid}/autogroup").write_text("0")
    if proc.wait() != 0:
        log.flush()
        pytest.fail(f"the background job of {fixture} failed:\n{(folder / 'job.log').read_text()[-3000:]}")
    return folder


@pytest.fixture(scope="session")
def regenerated_world(request) -> tuple[Path, dict]:
    """(root, {"seconds", "torch_settings_restored"}) of the background generation."""
    folder = _background_result(request, "regenerated_world")
    return folder / "tiny", json.loads((folder / "generation.json").read_text())


@pytest.fixture(scope="session")
def toy(request):
    """The launches of tests/ds_toy.py that the multi-rank checkpoint and preemption tests read."""
    return Scenarios.load(_background_result(request, "toy") / "scenarios.json")


SHM = Path("/dev/shm")


def _shm_buffers() -> set[str]:
    return {p.name for p in SHM.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")} if SHM.is_dir() else set()


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left_behind(request):
    """The suite's own check that it leaves nothing in RAM-backed /dev/shm: every DeepSpeed CPU rank
    it starts, killed ones included, must not leave its 66 MB allreduce buffer behind (the stages
    unlink it right after init: pipeline.train.engine.unlink_shm_buffers)."""
    before = request.config.stash.get(_SHM_BEFORE, None)
    before = _shm_buffers() if before is None else before
    yield
    left = sorted(_shm_buffers() - before)
    assert not left, f"the test session left {len(left)} DeepSpeed buffer(s) in {SHM}: {left}"


@pytest.fixture(scope="session")
def tiny_world():
    folder = _tinyworld_cache()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:  # parallel pytest runs
        fcntl.flock(lock, fcntl.LOCK_EX)
        return ensure(folder, seed=0)


def write_training_shards(world, out: Path, *, samples: int, per_shard: int, seed: int = 0,
                          stage: str = "stage1", records: list[dict] | None = None, prefix: str | None = None) -> Path:
    """Shards per the shard contract, written with the shared writer from the world's stage-1 or
    stage-2 JSON (or the given `records`); the retrieved text is another sample's answer (what the retrieval join would give
    for a related image), the caption the sample's first answer; text-only samples keep no image."""
    if records is None:
        records = json.loads((world.stage1_json if stage == "stage1" else world.stage2_json).read_text())
    records = records[:samples]
    captions = [r["conversations"][1]["value"] for r in records]
    rng = random.Random(seed)
    rows = []
    for shard_index, start in enumerate(range(0, len(records), per_shard)):
        with ShardWriter(out / shard_name(shard_index)) as writer:
            for i, record in enumerate(records[start:start + per_shard], start):
                key = f"{prefix or stage}_{i:06d}"
                image = (world.images / record["image"]).read_bytes() if "image" in record else None
                other = captions[(i + 1 + rng.randrange(len(captions) - 1)) % len(captions)]
                meta = {"key": key, "source": f"tiny-{stage}", "conversations": record["conversations"],
                        "image_caption": captions[i] if image else "", "toxic": False,
                        "retrieved": [{"text": other, "score": 0.5, "caption_id": f"c{i}"}] if image else []}
                offset = writer.write(key, image, meta)
                rows.append({"key": key, "shard": shard_name(shard_index), "offset": offset,
                             "n_tokens": 64, "has_image": image is not None, "source": f"tiny-{stage}"})
    write_manifest(out / "manifest.parquet", rows)
    return out


@pytest.fixture(scope="session")
def retrieval_python() -> Path:
    python = REPO / ".retrieval-venv" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} is missing: run `make retrieval-env` (the retrieval stages need it)")
    return python


def caption_index_args(world, output_dir: Path, python: Path) -> list[str]:
    """stages.caption_index's arguments for the tiny world's corpus (configs/tiny/caption_index.yaml)."""
    return ["--config", str(REPO / "configs/tiny/caption_index.yaml"), f"captions={world.captions}",
            f"toxic_snippets={world.toxic_snippets}", f"clip_model=hf_clip:{world.clip}",
            f"output_dir={output_dir}", f"retrieval_python={python}", "captions_per_tar=1000"]


@pytest.fixture(scope="session")
def tiny_index(tiny_world, retrieval_python, tmp_path_factory) -> tuple[Path, dict]:
    """(folder, stats) of the tiny world's caption index, built once per session by the real stage
    over a half-written earlier attempt (which must be detected). tests/test_caption_index.py checks
    it; the ablation suite and the retrieval joins query it (the suite's own caption_index step finds
    it up to date by its fingerprint)."""
    output_dir = tmp_path_factory.getbasetemp() / "index"
    (output_dir / "stats.json").unlink(missing_ok=True)  # whatever was there is now half-written
    (output_dir / "metadata").mkdir(parents=True, exist_ok=True)
    (output_dir / "text.index").write_bytes(b"half-written")
    stats = caption_index.main(caption_index_args(tiny_world, output_dir, retrieval_python))
    return output_dir, stats


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory):
    """One real `mlflow server` (a start is ~10 s of 2 cores) for the stage tests that log to one,
    each into an experiment of its own."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture(scope="session")
def stage1_shards(tiny_world, tmp_path_factory):
    return write_training_shards(tiny_world, tmp_path_factory.mktemp("shards"), samples=96, per_shard=12)
