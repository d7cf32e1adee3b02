"""Shared fixtures: the tiny world (generated once per source revision) and small training shards."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.data.shards import ShardWriter, shard_name, write_manifest
from pipeline.tinyworld import ensure

_REGENERATION = pytest.StashKey[tuple]()

REPO = Path(__file__).resolve().parent.parent
# DeepSpeed's ZeRO optimizer check imports its Muon kernels, whose @torch.compile pulls in all of
# inductor (seconds per rank at every start); nothing in the tests compiles. Every process the suite
# starts (stage launches, ablation steps, Slurm jobs, benchmarks) inherits this.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def _tinyworld_cache() -> Path:
    """Keyed by the generator's source, so a changed generator never serves a stale world."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "pipeline" / "tinyworld").glob("*.py")):
        digest.update(path.read_bytes())
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tga-pipeline" / "tinyworld"
    return root / digest.hexdigest()[:16]


# tests/test_tinyworld.py regenerates the world from scratch (~2 min of one core) to prove the same
# seed gives the same bytes. The suite keeps one core idle on average, so that generation starts in
# the background as soon as collection shows the test will run, and the test waits for its result.
_WORLD_SCRIPT = """
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
"""


def pytest_collection_finish(session):
    if session.config.option.collectonly or not any(
            item.nodeid.startswith("tests/test_tinyworld.py") for item in session.items):
        return
    folder = Path(tempfile.mkdtemp(prefix="tinyworld-regenerated-"))
    log = open(folder / "generation.log", "wb")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    session.config.stash[_REGENERATION] = (subprocess.Popen(
        [sys.executable, "-c", _WORLD_SCRIPT, str(folder)], cwd=REPO, env=env, stdout=log,
        stderr=subprocess.STDOUT), folder, log)


def pytest_sessionfinish(session):
    started = session.config.stash.get(_REGENERATION, None)
    if started is not None:
        proc, folder, log = started
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def regenerated_world(request) -> tuple[Path, dict]:
    """(root, {"seconds", "torch_settings_restored"}) of the background generation (waited for)."""
    started = request.config.stash.get(_REGENERATION, None)
    if started is None:
        pytest.fail("the background tiny-world generation was not started (pytest_collection_finish)")
    proc, folder, log = started
    if proc.wait() != 0:
        log.flush()
        pytest.fail(f"tiny world generation failed:\n{(folder / 'generation.log').read_text()[-3000:]}")
    return folder / "tiny", json.loads((folder / "generation.json").read_text())


SHM = Path("/dev/shm")


def _shm_buffers() -> set[str]:
    return {p.name for p in SHM.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")} if SHM.is_dir() else set()


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left_behind():
    """The suite's own check that it leaves nothing in RAM-backed /dev/shm: every DeepSpeed CPU rank
    it starts, killed ones included, must not leave its 66 MB allreduce buffer behind (the stages
    unlink it right after init: pipeline.train.engine.unlink_shm_buffers)."""
    before = _shm_buffers()
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
def stage1_shards(tiny_world, tmp_path_factory):
    return write_training_shards(tiny_world, tmp_path_factory.mktemp("shards"), samples=96, per_shard=12)
