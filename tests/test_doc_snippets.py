"""The shell snippets the docs mark as runnable on the tiny world (`<!-- runnable: tiny -->` before a
```bash block) run as written, from a folder laid out as `make demo` leaves the checkout."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_training_shards
from tests.stage_runner import REPO, stage_env

MARK = "<!-- runnable: tiny -->"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def snippets() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for match in re.finditer(re.escape(MARK) + r"\s*```bash\n(.*?)```", doc.read_text(), re.S):
            found.append((doc.relative_to(REPO).as_posix(), match.group(1)))
    return found


def test_the_docs_mark_runnable_snippets():
    assert {doc for doc, _ in snippets()} >= {"README.md", "docs/data.md"}


@pytest.fixture(scope="module")
def demo_checkout(tiny_world, tmp_path_factory):
    """The checkout's code and configs with the `work/` that `make demo` writes (the tiny world and
    both stages' shards), and `.venv` the environment running these tests."""
    root = tmp_path_factory.mktemp("checkout")
    for name in ("configs", "pipeline", "stages", "launch"):
        (root / name).symlink_to(REPO / name)
    (root / ".venv").symlink_to(Path(sys.prefix))
    (root / "work").mkdir()
    (root / "work" / "tiny").symlink_to(tiny_world.root)
    for stage in ("stage1", "stage2"):
        write_training_shards(tiny_world, root / "work" / "shards" / stage, samples=48, per_shard=12, stage=stage)
    return root


@pytest.mark.parametrize("doc,snippet", snippets(), ids=[f"{d}#{i}" for i, (d, _) in enumerate(snippets())])
def test_a_runnable_snippet_runs_as_written(demo_checkout, doc, snippet):
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", snippet], cwd=demo_checkout, env=stage_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{doc}:\n{snippet}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
