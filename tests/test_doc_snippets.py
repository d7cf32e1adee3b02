"""What README.md and docs/ tell a newcomer to type works as written.

Every command block (```bash, ```sh, or a fence without a language) carries a mark on the line
before it: `<!-- runnable: tiny -->` blocks run here, in order, from a folder laid out as
`make demo` leaves the checkout, in a fresh shell's environment (no PYTHONPATH, no virtualenv on
PATH: the environment's interpreter is `.venv/bin/python`, as the README says); `<!-- not run:
gpu | cluster | real data | long -->` says why a block cannot run here ("long": a make target of
minutes, timed in the README). Output and diagrams are ```text. Numbers the README states about
the tiny world are held against what the generator produced, as ranges where they vary by CPU.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_training_shards
from tests.stage_runner import REPO
from tests.tiny_llava import build_tiny_llava

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNABLE = "runnable: tiny"
NOT_RUN = ("gpu", "cluster", "real data", "long")
COMMAND_LANGUAGES = ("bash", "sh", "shell", "console", "")
_BLOCK = re.compile(r"(?:<!--\s*(?P<mark>[^\n]*?)\s*-->[ \t]*\n[ \t]*)?```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)```",
                    re.S)
# An interpreter or launcher named without the environment's path: "No module named 'torch'" or
# "command not found" in a fresh shell.
_BARE = re.compile(r"(?<![\w./-])(python3?|deepspeed|pytest)(?= +(-m|-c|launch/|stages/|bench/|--|\[))")


@dataclasses.dataclass(frozen=True)
class Block:
    doc: str
    line: int
    lang: str
    mark: str | None
    body: str

    @property
    def name(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start("lang")) + 1
            found.append(Block(doc.relative_to(REPO).as_posix(), line, match["lang"], match["mark"], match["body"]))
    return found


def runnable() -> list[Block]:
    return [b for b in blocks() if b.mark == RUNNABLE]


def test_every_command_block_is_run_here_or_marked_as_needing_a_gpu_a_cluster_or_real_data():
    unmarked = [f"{b.name} ({b.mark or 'no mark'}): {b.body.splitlines()[0] if b.body else ''}"
                for b in blocks() if b.lang in COMMAND_LANGUAGES and b.mark != RUNNABLE
                and not (b.mark or "").removeprefix("not run: ") in NOT_RUN]
    assert not unmarked, ("command blocks without a mark (<!-- runnable: tiny --> or <!-- not run: "
                          f"{' | '.join(NOT_RUN)} -->; output is ```text):\n" + "\n".join(unmarked))
    assert {b.doc for b in runnable()} >= {"README.md", "docs/data.md", "docs/evaluation.md", "docs/analysis.md"}


def test_documented_commands_name_the_environments_interpreter_as_a_fresh_shell_needs():
    bare = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), start=1):
            bare += [f"{doc.relative_to(REPO)}:{number}: {line.strip()}" for _ in _BARE.finditer(line)]
    assert not bare, "write .venv/bin/python (or .venv/bin/deepspeed) as the README says:\n" + "\n".join(bare)


def fresh_shell_env() -> dict[str, str]:
    """What a new login shell has: no PYTHONPATH, no activated environment. Kept from this
    session: where caches live (the tiny world, DeepSpeed's prebuilt ops), and settings that make
    a 2-core machine faster without changing what a command does."""
    env = {"HOME": os.environ["HOME"], "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    for name in ("XDG_CACHE_HOME", "HF_HOME", "TORCH_EXTENSIONS_DIR", "TMPDIR"):
        if name in os.environ:
            env[name] = os.environ[name]
    return {**env, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}


@pytest.fixture(scope="module")
def demo_checkout(tiny_world, tiny_index, tmp_path_factory):
    """The checkout's code and configs with the `work/` that `make demo` writes: the tiny world, the
    caption index, both stages' shards and a stage-2 HF export (built without training:
    tests/tiny_llava.py), `.venv` and `.retrieval-venv` the environments running these tests."""
    root = tmp_path_factory.mktemp("checkout")
    for name in ("configs", "pipeline", "stages", "launch"):
        (root / name).symlink_to(REPO / name)
    (root / ".venv").symlink_to(Path(sys.prefix))
    (root / ".retrieval-venv").symlink_to((REPO / ".retrieval-venv").resolve())
    work = root / "work"
    work.mkdir()
    (work / "tiny").symlink_to(tiny_world.root)
    shutil.copytree(tiny_index[0], work / "index")
    for stage in ("stage1", "stage2"):
        write_training_shards(tiny_world, work / "shards" / stage, samples=48, per_shard=12, stage=stage)
    build_tiny_llava(tiny_world, work / "export" / "stage2-hf", insert_retrieved=True)
    return root


@pytest.mark.slow  # processes of the real tools: from seconds to a few minutes for the retrieval joins
@pytest.mark.parametrize("block", runnable(), ids=[b.name for b in runnable()])
def test_a_runnable_block_runs_as_written_in_a_fresh_shell(demo_checkout, block):
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.body], cwd=demo_checkout, env=fresh_shell_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (f"{block.name}:\n{block.body}\n--- stdout\n{done.stdout[-3000:]}\n"
                                  f"--- stderr\n{done.stderr[-3000:]}")


# README sentence (a regex whose group is the number) -> world.json metric, and how far the number
# may be from the generator's on another CPU (float rounding in training moves a retrieval or two).
WORLD_NUMBERS = {
    r"retrieves a snippet of the right\s+concept for (\d\.\d+) of the\s+toxic pictures":
        ("clip_toxic_image_retrieves_own_concept_snippet", 0.05),
    r"the LLM refuses every toxic request as text": ("llm_refusal_rate_toxic_text", 0.0),
    r"asked without a picture \(refusal (\d\.\d+)\)": ("llm_refusal_rate_picture_questions", 0.05),
    r"holds a concept's sign \((\d\.\d+);": ("llm_refusal_rate_described_sign_pictures", 0.05),
    r"benign descriptions\s+(\d\.\d+)\)": ("llm_refusal_rate_described_benign_pictures", 0.05),
}


def test_the_readmes_tiny_world_numbers_are_what_the_generator_measured(tiny_world):
    import json

    readme = (REPO / "README.md").read_text()
    metrics = json.loads(tiny_world.world_json.read_text())["metrics"]
    wrong = []
    for pattern, (key, tolerance) in WORLD_NUMBERS.items():
        match = re.search(pattern, readme)
        assert match, f"README.md no longer says /{pattern}/; update WORLD_NUMBERS with the text"
        assert key in metrics, f"world.json has no metric {key}: {sorted(metrics)}"
        said = float(match[1]) if match.groups() else 1.0  # "every": all of them
        if abs(said - metrics[key]) > tolerance:
            wrong.append(f"README says {match[0]!r}, world.json {key} = {metrics[key]}")
    assert not wrong, "\n".join(wrong)
