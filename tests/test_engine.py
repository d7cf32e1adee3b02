"""DeepSpeed set-up (pipeline/train/engine.py): "auto" values filled as transformers fills them, the
optimizer DeepSpeed accepts for the config, and a GPU node that never trains on CPU by accident."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig

from pipeline.config import load_config
from pipeline.train import engine
from pipeline.train.cli import run_training_stage
from pipeline.train.config import TrainConfig
from tests.stage_runner import stage_overrides

FAKE_NVIDIA_SMI = """#!/bin/sh
[ "$1" = "-L" ] || exit 2
echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)"
echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000001)"
"""


def train_config(world, tmp_path, deepspeed: dict | str = "configs/deepspeed/zero3.json") -> TrainConfig:
    """The tiny stage-1 config with `deepspeed` (a configs/ path, or a dict written to a file)."""
    if isinstance(deepspeed, dict):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(deepspeed))
        deepspeed = path
    overrides = stage_overrides(world, tmp_path, tmp_path / "run", deepspeed_config=deepspeed)
    return load_config(TrainConfig, "configs/tiny/stage1.yaml", overrides)


@pytest.mark.parametrize("path", ["configs/deepspeed/zero3.json", "configs/deepspeed/zero3_offload.json"])
def test_auto_bucket_sizes_are_filled_from_the_llm_hidden_size_as_transformers_does(tiny_world, tmp_path, path):
    hidden = AutoConfig.from_pretrained(tiny_world.llm).hidden_size
    zero = engine.deepspeed_config(train_config(tiny_world, tmp_path, path), "cpu")["zero_optimization"]
    # transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig.trainer_config_finalize
    assert zero["reduce_bucket_size"] == hidden * hidden
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * hidden * hidden)
    assert zero["stage3_param_persistence_threshold"] == 10 * hidden


def test_bucket_sizes_given_as_numbers_stay_and_stage3_keys_leave_a_stage2_config(tiny_world, tmp_path):
    hidden = AutoConfig.from_pretrained(tiny_world.llm).hidden_size
    ds = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": "auto"}}
    zero = engine.deepspeed_config(train_config(tiny_world, tmp_path, ds), "cpu")["zero_optimization"]
    assert zero["reduce_bucket_size"] == 5e8 and zero["stage3_prefetch_bucket_size"] == int(0.9 * hidden * hidden)
    ds = {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                "stage3_param_persistence_threshold": "auto"}}
    zero = engine.deepspeed_config(train_config(tiny_world, tmp_path, ds), "cpu")["zero_optimization"]
    assert zero == {"stage": 2, "reduce_bucket_size": hidden * hidden}


def test_llava_zero3_json_resolves_as_under_llava_scripts(tiny_world, tmp_path):
    """LLaVA's scripts/zero3.json, as its train scripts hand it to the HF Trainer."""
    llava = {"fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16}, "bf16": {"enabled": "auto"},
             "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
             "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
                                   "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                   "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
                                   "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True}}
    cfg = train_config(tiny_world, tmp_path, llava)
    ds = engine.deepspeed_config(cfg, "cpu")
    assert "auto" not in json.dumps(ds), ds
    assert ds["fp16"]["enabled"] is False and ds["bf16"]["enabled"] is False  # fp32 on CPU
    assert ds["train_micro_batch_size_per_gpu"] == cfg.loader.batch_size and "train_batch_size" not in ds
    with_optimizer = {**llava, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    with pytest.raises(ValueError, match="remove the 'optimizer' section"):
        engine.deepspeed_config(train_config(tiny_world, tmp_path, with_optimizer), "cpu")


def test_auto_bucket_sizes_without_a_readable_llm_config_name_the_key_and_the_fix(tiny_world, tmp_path):
    cfg = train_config(tiny_world, tmp_path)
    (tmp_path / "empty").mkdir()
    broken = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, llm=tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"auto\" bucket sizes .* model\.llm=.*empty has no readable config"):
        engine.deepspeed_config(broken, "cpu")


def test_an_offloaded_optimizer_is_deepspeed_cpu_adam_and_a_device_one_torch_adamw(tiny_world, tmp_path):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    params = [torch.nn.Parameter(torch.zeros(4))]
    offload = train_config(tiny_world, tmp_path, "configs/deepspeed/zero3_offload.json")
    ds = engine.deepspeed_config(offload, "cpu")
    assert engine.optimizer_offloaded(ds)
    optimizer = engine.build_optimizer(params, offload, ds, "cpu")  # builds cpu_adam on first use
    assert isinstance(optimizer, DeepSpeedCPUAdam)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (offload.optim.lr, (0.9, 0.999), 0.0)
    plain = train_config(tiny_world, tmp_path)
    ds = engine.deepspeed_config(plain, "cpu")
    assert not engine.optimizer_offloaded(ds)
    assert type(engine.build_optimizer(params, plain, ds, "cpu")) is torch.optim.AdamW


@pytest.fixture
def no_cuda(monkeypatch):
    """torch sees no GPU (a CPU build, or a CUDA build newer than the driver), whatever this host has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def driver_lists_gpus(tmp_path, monkeypatch):
    """An `nvidia-smi` on PATH that lists two GPUs."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (folder / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_auto_is_cpu_where_no_driver_lists_a_gpu(no_cuda, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi at all
    assert engine.gpus_listed_by_driver() == 0
    assert engine.device_type("auto") == "cpu" and engine.device_type("cpu") == "cpu"


def test_auto_stops_in_one_line_when_the_driver_lists_gpus_that_torch_cannot_see(no_cuda, driver_lists_gpus):
    assert engine.gpus_listed_by_driver() == 2
    with pytest.raises(SystemExit) as stop:
        engine.device_type("auto")
    message = stop.value.code
    assert isinstance(message, str) and "\n" not in message
    assert "sees none of the 2 GPU(s) `nvidia-smi -L` lists" in message and "set device: cpu" in message
    assert engine.device_type("cpu") == "cpu", "an explicit CPU run on a GPU node stays possible"


def test_cuda_without_a_gpu_torch_can_use_stops_in_one_line(no_cuda, driver_lists_gpus):
    with pytest.raises(SystemExit) as stop:
        engine.device_type("cuda")
    assert "device: cuda, but torch" in stop.value.code and "\n" not in stop.value.code


def test_the_stage_entry_stops_before_any_process_group_on_a_gpu_node_whose_torch_sees_none(
        tiny_world, stage1_shards, tmp_path, monkeypatch, no_cuda, driver_lists_gpus):
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29998"}.items():
        monkeypatch.setenv(name, value)
    argv = ["--config", "configs/tiny/stage1.yaml", *stage_overrides(tiny_world, stage1_shards, tmp_path / "run"),
            "device=auto"]
    with pytest.raises(SystemExit) as stop:
        run_training_stage("stage1", argv)
    assert isinstance(stop.value.code, str) and stop.value.code.startswith("device: auto, but torch")
    assert not torch.distributed.is_initialized()
    assert not (tmp_path / "run").exists()


def test_the_real_stage_configs_ask_for_cuda():
    """`device: cuda` fails at start on a node without a usable GPU instead of training there on CPU."""
    for path in ("configs/stage1.yaml", "configs/stage2.yaml"):
        assert yaml.safe_load(Path(path).read_text())["device"] == "cuda", path
