"""One TGA ablation end to end: data -> stage 1 -> stage 2 -> export -> retrieval for eval -> DSR + ability.

    python -m pipeline.eval.ablation configs/ablations/tiny/iii_tga.yaml [--dry-run]
    python -m pipeline.eval.ablation --table configs/ablations/tiny/*.yaml      (results side by side)

An ablation file (`AblationConfig`) names the base configs of every stage and only the overrides
that make this ablation what it is; run folders and the stage-1 -> stage-2 projector hand-over are
derived from `train_dir`. Steps run in order as the ordinary commands (`stages.*`, the launch
scripts, `pipeline.export`, `pipeline.eval.*`), so a step that fails can be rerun by hand from the
printed command line. Rerunning the ablation resumes it: caption_index and retrieval_join skip
finished work by their fingerprints, a training stage whose run has its export is skipped (and an
interrupted one resumes from its latest checkpoint), the HF export is kept; evaluations rerun.
Ablations that train alike share `train_dir` (iii and iv), so the model is trained once.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from pipeline.config import ConfigError, InputPath, load_config
from pipeline.eval.queries import default_image_root

PROJECTOR = Path("export/projector.safetensors")  # what a training run writes when it finished


@dataclasses.dataclass(frozen=True)
class ConfigRun:
    config: InputPath                  # a stage's base YAML
    overrides: list[str] = dataclasses.field(default_factory=list)  # key.sub=value on top of it


@dataclasses.dataclass(frozen=True)
class NoToxicIndex:
    """Ablation (iv): the eval images query an index built from the corpus minus every toxic text."""
    captions: Path                     # the training corpus (toxic rows are dropped)
    index: ConfigRun                   # caption_index config; captions/toxic_snippets/output_dir are set here
    toxic_snippets: Path | None = None  # their texts are dropped from the corpus too


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    toxic: Path                        # DSR data (LLaVA JSON with text twins and concepts)
    benign: Path                       # ability data (LLaVA JSON with reference answers)
    join: ConfigRun                    # retrieval_join config for eval files; input/image_root/index_dir/output_dir set here
    index_dir: Path                    # the caption index eval images query (built by `indexes` or `no_toxic_index`)
    insert_retrieved: bool             # must match how the model was trained (prompt.insert_retrieved)
    images: Path | None = None         # image root of both files; None: DATA_DIR/../images (the tiny world)
    args: list[str] = dataclasses.field(default_factory=list)  # extra dsr/ability options (--device cuda ...)


@dataclasses.dataclass(frozen=True)
class AblationConfig:
    name: str
    train_dir: Path                    # runs/stage1, runs/stage2, export/hf
    eval_dir: Path                     # retrieved/, dsr/, ability/ (and index_no_toxic/ for iv)
    stage1: ConfigRun
    stage2: ConfigRun
    eval: EvalConfig
    tiny_world: Path | None = None     # generate the tiny world here first (kept when it has the eval files)
    indexes: list[ConfigRun] = dataclasses.field(default_factory=list)         # caption_index runs first
    training_joins: list[ConfigRun] = dataclasses.field(default_factory=list)  # then the training shards
    no_toxic_index: NoToxicIndex | None = None
    launch_env: dict[str, str] = dataclasses.field(default_factory=dict)  # CPU_RANKS, GPUS_PER_NODE, ...


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    skip_if: tuple[Path, ...] = ()     # the step's products: all present = nothing to do
    produces: Path | None = None       # must exist after the step, or the ablation stops

    def shown(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.argv)


def export_dir(cfg: AblationConfig) -> Path:
    return cfg.train_dir / "export" / "hf"


def plan(cfg: AblationConfig, python: str = sys.executable) -> list[Step]:
    """The ablation's steps in order; pure, so `--dry-run` and the tests see exactly what runs."""
    py = [python, "-m"]
    run1, run2 = cfg.train_dir / "runs" / "stage1", cfg.train_dir / "runs" / "stage2"
    steps = []
    if cfg.tiny_world is not None:
        steps.append(Step("tiny world", [*py, "pipeline.tinyworld", "--out", str(cfg.tiny_world)],
                          skip_if=(cfg.tiny_world / "world.json", cfg.eval.toxic, cfg.eval.benign),
                          produces=cfg.tiny_world / "world.json"))
    steps += [Step(f"caption_index {r.config}", [*py, "stages.caption_index", "--config", str(r.config), *r.overrides])
             for r in cfg.indexes]
    steps += [Step(f"retrieval_join {r.config}", [*py, "stages.retrieval_join", "--config", str(r.config), *r.overrides])
              for r in cfg.training_joins]
    launch_env = {"PYTHON": python, **cfg.launch_env}
    steps.append(Step("stage1", ["bash", "launch/stage1.sh", *cfg.stage1.overrides, f"run_dir={run1}"],
                      {**launch_env, "CONFIG": str(cfg.stage1.config)}, (run1 / PROJECTOR,), run1 / PROJECTOR))
    steps.append(Step("stage2", ["bash", "launch/stage2.sh", *cfg.stage2.overrides, f"run_dir={run2}",
                                 f"model.projector={run1 / PROJECTOR}"],
                      {**launch_env, "CONFIG": str(cfg.stage2.config)}, (run2 / PROJECTOR,), run2 / PROJECTOR))
    model = export_dir(cfg)
    steps.append(Step("export", [*py, "pipeline.export", "--checkpoint", str(run2 / "checkpoints"), "--out", str(model)],
                      skip_if=(model / "config.json",), produces=model / "config.json"))
    steps += _no_toxic_index_steps(cfg, py)
    data = {"dsr": cfg.eval.toxic, "ability": cfg.eval.benign}
    images = ["--images", str(cfg.eval.images)] if cfg.eval.images is not None else []
    for tool, path in data.items():
        retrieved = []
        if cfg.eval.insert_retrieved:
            joined = cfg.eval_dir / "retrieved" / tool
            image_root = cfg.eval.images or default_image_root(path)
            steps.append(Step(f"retrieval_join {tool} data", [
                *py, "stages.retrieval_join", "--config", str(cfg.eval.join.config), *cfg.eval.join.overrides,
                f"input={path}", f"image_root={image_root}", f"index_dir={cfg.eval.index_dir}",
                f"output_dir={joined}"], produces=joined / "manifest.parquet"))
            retrieved = ["--retrieved", str(joined), "--insert-retrieved"]
        else:
            retrieved = ["--no-insert-retrieved"]
        out = cfg.eval_dir / tool
        steps.append(Step(tool, [*py, f"pipeline.eval.{tool}", "--model", str(model), "--data", str(path),
                                 "--out", str(out), *images, *retrieved, *cfg.eval.args],
                          produces=out / "summary.json"))
    return steps


def _no_toxic_index_steps(cfg: AblationConfig, py: list[str]) -> list[Step]:
    spec = cfg.no_toxic_index
    if spec is None:
        return []
    corpus = cfg.eval_dir / "captions_no_toxic.parquet"
    snippets = ["--toxic-snippets", str(spec.toxic_snippets)] if spec.toxic_snippets is not None else []
    return [
        Step("corpus without toxic texts", [*py, "pipeline.eval.corpus_filter", "--captions", str(spec.captions),
                                            *snippets, "--out", str(corpus)], produces=corpus),
        Step("caption_index without toxic texts", [
            *py, "stages.caption_index", "--config", str(spec.index.config), *spec.index.overrides,
            f"captions={corpus}", "toxic_snippets=null", f"output_dir={cfg.eval.index_dir}"],
            produces=cfg.eval.index_dir / "stats.json"),
    ]


def run(steps: list[Step], *, dry_run: bool = False) -> None:
    for number, step in enumerate(steps, start=1):
        head = f"[ablation {number}/{len(steps)}] {step.name}"
        if step.skip_if and all(path.exists() for path in step.skip_if):
            print(f"{head}: done already ({', '.join(map(str, step.skip_if))} exist)", flush=True)
            continue
        print(f"{head}: {step.shown()}", flush=True)
        if dry_run:
            continue
        status = _run_forwarding_signals(step.argv, {**os.environ, **step.env})
        if status != 0:
            raise SystemExit(f"{head} failed (exit {status}); fix it and rerun the ablation, or run the "
                             f"command above by hand")
        if step.produces is not None and not step.produces.exists():
            raise SystemExit(f"{head} ended without writing {step.produces} (preempted?); rerun the ablation "
                             f"to resume")


def _run_forwarding_signals(argv: list[str], env: dict[str, str]) -> int:
    """Run a step; a Slurm warning signal (USR1/TERM) reaching this process goes on to the step, so
    a training stage checkpoints and requeues the job as it would when launched directly."""
    child = subprocess.Popen(argv, env=env)
    forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def results(cfg: AblationConfig) -> dict:
    """The headline numbers of a finished ablation (None where an evaluation has not run)."""
    def read(tool: str) -> dict | None:
        path = cfg.eval_dir / tool / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else None

    dsr, ability = read("dsr"), read("ability")
    return {"ablation": cfg.name,
            **{f"dsr_{k}": (dsr["dsr"][k] if dsr else None) for k in ("image", "text", "gap")},
            **{k: (ability[k] if ability else None) for k in ("exact_match", "token_f1")}}


def table(rows: list[dict]) -> str:
    columns = list(rows[0])
    cell = lambda v: "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.eval.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", type=Path, help="ablation file(s) (configs/ablations/...)")
    parser.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    parser.add_argument("--table", action="store_true", help="print the results of finished ablations as a table")
    args = parser.parse_args(argv)
    try:
        configs = [load_config(AblationConfig, path) for path in args.configs]
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    if args.table:
        print(table([results(cfg) for cfg in configs]))
        return
    if len(configs) > 1:
        parser.error("run one ablation at a time (several files only with --table)")
    run(plan(configs[0]), dry_run=args.dry_run)


if __name__ == "__main__":
    main(sys.argv[1:])
