"""The shipped configs chain without edits: each stage reads what the one before it writes."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline.train.run_folder import RunFolder
from tests.stage_runner import REPO

CHAINS = {
    "real": {"index": "configs/caption_index.yaml", "join1": "configs/retrieval_join.yaml",
             "join2": "configs/retrieval_join_stage2.yaml", "stage1": "configs/stage1.yaml",
             "stage2": ["configs/stage2.yaml", "configs/stage2_lora.yaml"]},
    "tiny": {"index": "configs/tiny/caption_index.yaml", "join1": "configs/tiny/retrieval_join_stage1.yaml",
             "join2": "configs/tiny/retrieval_join_stage2.yaml", "stage1": "configs/tiny/stage1.yaml",
             "stage2": ["configs/tiny/stage2.yaml"]},
}


def load(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text())


def same(a, b) -> bool:
    return Path(a) == Path(b)


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_each_stage_reads_what_the_one_before_writes(chain):
    files = CHAINS[chain]
    index, join1, join2, stage1 = (load(files[k]) for k in ("index", "join1", "join2", "stage1"))
    assert same(join1["index_dir"], index["output_dir"]) and same(join2["index_dir"], index["output_dir"])
    assert join1["clip_model"] == join2["clip_model"] == index.get("clip_model", join1["clip_model"])
    assert same(stage1["shards"], join1["output_dir"]), f"{files['stage1']} reads other shards"
    projector = RunFolder(Path(stage1["run_dir"])).projector
    for path in files["stage2"]:
        stage2 = load(path)
        assert same(stage2["shards"], join2["output_dir"]), f"{path} reads other shards"
        assert same(stage2["model"]["projector"], projector), f"{path}: not stage 1's projector export"
        assert stage2["model"]["llm"] == stage1["model"]["llm"]
        assert stage2["model"]["vision_tower"] == stage1["model"]["vision_tower"]
        assert join1["clip_model"].split(":", 1)[1] == stage1["model"]["vision_tower"]


@pytest.mark.parametrize("script", ["caption_index", "retrieval_join", "stage1", "stage2"])
def test_launch_scripts_default_to_configs_that_exist(script):
    text = (REPO / "launch" / f"{script}.sh").read_text()
    defaults = re.findall(r"configs/[\w/.-]+\.yaml", text)
    assert defaults, f"launch/{script}.sh names no default config"
    for config in defaults:
        assert (REPO / config).is_file(), f"launch/{script}.sh: {config} does not exist"
