"""The preflight's /dev/shm check (pipeline/train/shared_memory.py): the "Bus error" of loader
workers in a container with Docker's 64 MiB default, said before the job starts."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

from transformers import CLIPVisionConfig

from pipeline.config import load_config
from pipeline.train.config import TrainConfig
from pipeline.train.launch_env import ranks_on_this_node
from pipeline.train.shared_memory import batch_bytes, shared_memory_warning
from tests.stage_runner import REPO, stage_env


def stage1_7b(tmp_path, llm):
    """configs/stage1.yaml's loader and prompt with a CLIP-L/14-336-shaped tower config (no weights needed)."""
    tower = tmp_path / "clip-336"
    CLIPVisionConfig(image_size=336, patch_size=14).save_pretrained(tower)
    return load_config(TrainConfig, REPO / "configs/stage1.yaml", [f"model.vision_tower={tower}", f"model.llm={llm}",
                                                                 f"shards={tmp_path}"])


def test_eight_ranks_of_the_7b_stage1_loader_do_not_fit_dockers_default_shm_and_the_line_says_the_fix(
        tiny_world, tmp_path):
    cfg = stage1_7b(tmp_path, tiny_world.llm)
    per_batch = batch_bytes(cfg.loader.batch_size, 336, cfg.prompt.max_tokens)
    assert per_batch > cfg.loader.batch_size * 3 * 336 * 336 * 4  # pixels and tokens
    warning = shared_memory_warning(cfg, 8, shm_bytes=64 * 2**20)
    assert warning.startswith("/dev/shm holds 64 MiB, but 8 rank(s) × ")
    assert "Bus error" in warning and "--shm-size=" in warning and "loader.num_workers" in warning
    need = 8 * cfg.loader.num_workers * cfg.loader.prefetch_factor * per_batch
    assert shared_memory_warning(cfg, 8, shm_bytes=need) is None  # exactly enough is enough


def test_no_workers_means_no_shared_memory_and_no_warning(tiny_world, tmp_path):
    cfg = stage1_7b(tmp_path, tiny_world.llm)
    cfg = dataclasses.replace(cfg, loader=dataclasses.replace(cfg.loader, num_workers=0))
    assert shared_memory_warning(cfg, 8, shm_bytes=1) is None


def test_ranks_on_a_node_come_from_the_launcher_or_slurm():
    assert ranks_on_this_node({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert ranks_on_this_node({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}) == 2
    assert ranks_on_this_node({"SLURM_NTASKS_PER_NODE": "8(x2)"}) == 8
    assert ranks_on_this_node({}) == 1


def test_the_dry_run_prints_the_shared_memory_check_for_this_machine(tiny_world, stage1_shards):
    """A loader that needs more than this machine's /dev/shm holds, with prompts of 10^8 tokens."""
    out = subprocess.run(
        [sys.executable, "-m", "stages.stage1_align", "--config", "configs/tiny/stage1.yaml", "--dry-run",
         "--world-size", "2", f"model.llm={tiny_world.llm}", f"model.vision_tower={tiny_world.clip}",
         f"shards={stage1_shards}", "loader.num_workers=8", "loader.batch_size=2",
         "loader.prefetch_factor=100", "prompt.max_tokens=100000000"],
        cwd=REPO, env=stage_env(), capture_output=True, text=True)
    assert out.returncode == 0 and "[dry-run] warning: /dev/shm holds" in out.stderr, out.stderr[-2000:]
