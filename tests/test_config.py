"""The config loader refuses bad input before work starts, naming the file and the key."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pytest

from pipeline.config import ConfigError, InputPath, flatten, load_config, parse_args, to_dict


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    warmup_ratio: float = 0.03
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclasses.dataclass(frozen=True)
class Job:
    data: InputPath
    out: Path
    steps: int = 10
    layers: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    tracking_uri: str | None = None
    bf16: bool = False
    optim: Optim = dataclasses.field(default_factory=Optim)


@pytest.fixture
def job_yaml(tmp_path):
    data = tmp_path / "shards"
    data.mkdir()
    path = tmp_path / "job.yaml"
    path.write_text(f"data: {data}\nout: {tmp_path / 'run'}\noptim:\n  lr: 0.5\n")
    return path


def test_yaml_and_defaults_build_a_typed_frozen_config(job_yaml):
    cfg = load_config(Job, job_yaml)
    assert cfg.optim.lr == 0.5 and cfg.optim.schedule == "cosine" and cfg.steps == 10
    assert isinstance(cfg.out, Path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3


def test_dotted_overrides_win_over_yaml_and_parse_as_yaml_values(job_yaml):
    cfg = load_config(Job, job_yaml, ["optim.lr=2e-5", "steps=7", "layers=[3,4,5]",
                                      "tracking_uri=http://127.0.0.1:5000", "bf16=true"])
    assert cfg.optim.lr == 2e-5 and cfg.steps == 7 and cfg.layers == [3, 4, 5]
    assert cfg.tracking_uri == "http://127.0.0.1:5000" and cfg.bf16 is True


def test_int_is_accepted_for_float_but_not_the_reverse(job_yaml):
    assert load_config(Job, job_yaml, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"'steps' must be int, got 1\.5"):
        load_config(Job, job_yaml, ["steps=1.5"])


def test_unknown_key_names_file_key_and_allowed_keys(job_yaml):
    with pytest.raises(ConfigError) as err:
        load_config(Job, job_yaml, ["optim.lrr=1"])
    message = str(err.value)
    assert str(job_yaml) in message and "'optim.lrr'" in message and "lr, warmup_ratio, schedule" in message


def test_wrong_type_names_the_key_and_expected_type(job_yaml):
    with pytest.raises(ConfigError, match=r"key 'layers\[1\]' must be int"):
        load_config(Job, job_yaml, ["layers=[1, x]"])
    with pytest.raises(ConfigError, match=r"key 'bf16' must be bool"):
        load_config(Job, job_yaml, ["bf16=3"])


def test_literal_lists_the_allowed_values(job_yaml):
    with pytest.raises(ConfigError, match=r"key 'optim.schedule' must be one of \['cosine', 'constant'\]"):
        load_config(Job, job_yaml, ["optim.schedule=linear"])


def test_missing_required_path_and_nonexistent_input_path_are_refused(tmp_path, job_yaml):
    with pytest.raises(ConfigError, match=r"missing required key 'data'"):
        load_config(Job, None, [f"out={tmp_path}"])
    with pytest.raises(ConfigError, match=r"key 'data': path does not exist: .*nowhere"):
        load_config(Job, job_yaml, [f"data={tmp_path / 'nowhere'}"])


def test_missing_or_malformed_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Job, tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{bad}: not valid YAML"):
        load_config(Job, bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Job, listing)


def test_malformed_override_is_refused(job_yaml):
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(Job, job_yaml, ["steps"])
    with pytest.raises(ConfigError, match="'optim' is a value"):
        load_config(Job, job_yaml, ["optim=3", "optim.lr=1"])


def test_parse_args_exits_with_the_message_not_a_traceback(job_yaml):
    assert parse_args(Job, ["--config", str(job_yaml), "steps=3"]).steps == 3
    with pytest.raises(SystemExit, match="config error: .*unknown key 'nope'"):
        parse_args(Job, ["--config", str(job_yaml), "nope=1"])


def test_resolved_config_round_trips_through_its_plain_dict(job_yaml, tmp_path):
    import yaml

    cfg = load_config(Job, job_yaml, ["steps=4"])
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(Job, dumped) == cfg
    assert flatten(cfg)["optim.lr"] == 0.5 and flatten(cfg)["steps"] == 4
