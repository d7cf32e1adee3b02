"""The four ablation files of the paper: every stage they run loads with its real config class, and
they differ from each other exactly where the ablation says they do.

The stage configs are checked as the runner will start them (base YAML + the ablation's overrides +
the run folders the runner adds). Paths that only exist once earlier stages ran (shards, model
folders, indexes) are pointed at an existing folder: what is checked is every key, type and
cross-field rule, not the machine's files.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import pytest
import yaml

from pipeline.config import InputPath, load_config
from pipeline.eval.ablation import AblationConfig, Step, plan, retrieved_dir
from pipeline.retrieval.config import CaptionIndexConfig, RetrievalJoinConfig
from pipeline.train.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
ABLATIONS = ("i_plain_llava", "ii_retrieved_text_only", "iii_tga", "iv_no_toxic_index")
WORLDS = ("tiny", "real")
STAGE_CLASSES = {"stages.caption_index": CaptionIndexConfig, "stages.retrieval_join": RetrievalJoinConfig}


@pytest.fixture(autouse=True)
def repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # config paths are relative to the repo root


def _input_keys(cls, prefix: str = "") -> list[str]:
    """Dotted keys of every InputPath field (also optional ones) of a config class."""
    keys = []
    for field in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[field.name]
        options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if InputPath in options:
            keys.append(prefix + field.name)
        elif dataclasses.is_dataclass(tp):
            keys += _input_keys(tp, f"{prefix}{field.name}.")
    return keys


def _effective(config: Path, overrides: list[str]) -> dict:
    raw = yaml.safe_load(config.read_text()) or {}
    for item in overrides:
        key, _, value = item.partition("=")
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return raw


def _lookup(raw: dict, key: str):
    for part in key.split("."):
        if not isinstance(raw, dict) or part not in raw:
            return None
        raw = raw[part]
    return raw


def load_step_config(cls, config: Path, overrides: list[str], existing: Path):
    """`cls` from the YAML + overrides, every path input that is set pointed at `existing`."""
    raw = _effective(config, overrides)
    stand_ins = [f"{key}={existing}" for key in _input_keys(cls) if _lookup(raw, key) is not None]
    return load_config(cls, config, [*overrides, *stand_ins])


def stage_configs(steps: list[Step], existing: Path) -> dict[str, object]:
    """Every stage config the plan starts, loaded with its class: {step name: config}."""
    loaded = {}
    for step in steps:
        if step.argv[:2] == ["bash", "launch/stage1.sh"] or step.argv[:2] == ["bash", "launch/stage2.sh"]:
            loaded[step.name] = load_step_config(TrainConfig, Path(step.env["CONFIG"]), step.argv[2:], existing)
        elif len(step.argv) > 2 and step.argv[2] in STAGE_CLASSES:
            assert step.argv[3] == "--config", step.shown()
            loaded[step.name] = load_step_config(STAGE_CLASSES[step.argv[2]], Path(step.argv[4]), step.argv[5:],
                                                 existing)
    return loaded


def ablation(world: str, name: str) -> AblationConfig:
    return load_config(AblationConfig, REPO / "configs" / "ablations" / world / f"{name}.yaml")


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", ABLATIONS)
def test_every_stage_of_every_ablation_loads_with_its_real_config_class(world, name, tmp_path):
    steps = plan(ablation(world, name), python="python")
    configs = stage_configs(steps, tmp_path)
    assert isinstance(configs["stage1"], TrainConfig) and configs["stage1"].stage == "stage1"
    assert isinstance(configs["stage2"], TrainConfig) and configs["stage2"].stage == "stage2"
    for step_name, cfg in configs.items():
        if isinstance(cfg, RetrievalJoinConfig) and step_name.endswith(" data"):  # an eval file's join
            assert cfg.output_dir.parent == retrieved_dir(ablation(world, name))
    assert [s.name for s in steps][-1] == "ability"


def _training(world: str, name: str, tmp_path: Path) -> tuple[TrainConfig, TrainConfig]:
    configs = stage_configs(plan(ablation(world, name), python="python"), tmp_path)
    return configs["stage1"], configs["stage2"]


@pytest.mark.parametrize("world", WORLDS)
def test_the_ablations_differ_exactly_as_tga_md_defines_them(world, tmp_path):
    plain, retrieved_only, tga, no_toxic = (_training(world, name, tmp_path) for name in ABLATIONS)
    for stage in (0, 1):
        # (i) plain LLaVA: no retrieved text, no alignment terms at all
        assert not plain[stage].prompt.insert_retrieved
        assert not plain[stage].tga.align_on and not plain[stage].tga.pair_on
        # (ii) = (iii) with the alignment terms detached (the released code's math.exp)
        assert retrieved_only[stage].prompt.insert_retrieved and retrieved_only[stage].tga.detach_alignment
        assert dataclasses.replace(retrieved_only[stage].tga, detach_alignment=False) == tga[stage].tga
        # (iii) the differentiable TGA loss
        assert tga[stage].prompt.insert_retrieved and tga[stage].tga.align_on and tga[stage].tga.pair_on
        assert not tga[stage].tga.detach_alignment and tga[stage].tga.align_weight > 0
        # (iv) trains exactly as (iii)
        assert no_toxic[stage] == tga[stage]
        for other in (plain, retrieved_only):
            assert dataclasses.replace(other[stage], run_dir=tga[stage].run_dir, tga=tga[stage].tga,
                                       prompt=tga[stage].prompt) == tga[stage]


@pytest.mark.parametrize("world", WORLDS)
def test_each_ablation_evaluates_with_the_prompt_it_was_trained_with(world, tmp_path):
    for name in ABLATIONS:
        cfg = ablation(world, name)
        stage2 = _training(world, name, tmp_path)[1]
        assert cfg.eval.insert_retrieved == stage2.prompt.insert_retrieved, name
        tools = [s for s in plan(cfg, python="python") if s.name in ("dsr", "ability")]
        assert len(tools) == 2
        for step in tools:
            assert ("--retrieved" in step.argv) == cfg.eval.insert_retrieved, step.shown()


@pytest.mark.parametrize("world", WORLDS)
def test_only_ablation_iv_queries_an_index_without_toxic_texts_and_shares_iiis_model(world, tmp_path):
    tga, no_toxic = ablation(world, "iii_tga"), ablation(world, "iv_no_toxic_index")
    assert no_toxic.train_dir == tga.train_dir and no_toxic.eval_dir != tga.eval_dir
    assert tga.no_toxic_index is None and no_toxic.no_toxic_index is not None
    steps = {s.name: s for s in plan(no_toxic, python="python")}
    index = stage_configs([steps["caption_index without toxic texts"]], tmp_path)
    built = index["caption_index without toxic texts"]
    assert built.toxic_snippets is None and built.output_dir == no_toxic.eval.index_dir
    assert f"captions={no_toxic.eval_dir / 'captions_no_toxic.parquet'}" in steps["caption_index without toxic texts"].argv
    assert f"index_dir={no_toxic.eval.index_dir}" in steps["retrieval_join dsr data"].argv
    assert no_toxic.eval.index_dir != tga.eval.index_dir


def test_the_readme_shows_one_command_per_ablation_and_world():
    readme = (REPO / "configs" / "ablations" / "README.md").read_text()
    for world in WORLDS:
        for name in ABLATIONS:
            assert f"python -m pipeline.eval.ablation configs/ablations/{world}/{name}.yaml" in readme, (world, name)
