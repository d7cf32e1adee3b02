"""TGA ablations end to end: data -> stage 1 -> stage 2 -> export -> retrieval for eval -> DSR,
alignment, over-refusal, ability; and the four of them as one suite with a results table.

    python -m pipeline.eval.ablation configs/ablations/tiny/iii_tga.yaml [--dry-run]
    python -m pipeline.eval.ablation --table [--seeds 0 1] configs/ablations/tiny/i*.yaml  (results side by side)
    python -m pipeline.eval.ablation --suite [--seeds 0 1] --out work/ablations FILE...  (results.json/md/png)

An ablation file (`AblationConfig`) names the base configs of every stage and only the overrides
that make this ablation what it is; run folders and the stage-1 -> stage-2 projector hand-over are
derived from `train_dir`. Steps run in order as the ordinary commands (`stages.*`, the launch
scripts, `pipeline.export`, `pipeline.eval.*`, `pipeline.analysis.alignment`), so a step that fails
can be rerun by hand from the printed command line. Rerunning the ablation resumes it: caption_index
and retrieval_join skip finished work by their fingerprints, a training stage whose run has its
export is skipped (and an interrupted one resumes from its latest checkpoint), the HF export is
kept; evaluations rerun. Ablations that train alike share `train_dir` (iii and iv), so the model is
trained once.

A suite trains every ablation once per seed, in `seed-<N>` subfolders of its train_dir and
eval_dir with `seed=<N>` after both stages' overrides (iii and iv still share a training per
seed), then writes results.json/md/png (ablation_results.py) and an MLflow parent run with a child
run per ablation (ablation_tracking.py).
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

import yaml

from pipeline.config import ConfigError, InputPath, load_config
from pipeline.eval import ablation_results, ablation_tracking
from pipeline.eval.queries import default_image_root
from pipeline.mlflow_client import embedded_tracking_uri
from pipeline.train.run_folder import RunFolder

ALIGNMENT_OPTIONS = ("--device", "--dtype", "--batch-size")  # eval.args the alignment tool takes too


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
    images: Path | None = None         # image root of the files; None: DATA_DIR/../images (the tiny world)
    benign_requests: Path | None = None  # over-refusal control: the toxic file's format, benign images
    # The eval files' retrieval joins (one folder per file); they depend on the index only, so
    # ablations querying one index share them (and every seed does). None: <eval_dir>/retrieved.
    retrieved_dir: Path | None = None
    args: list[str] = dataclasses.field(default_factory=list)  # extra dsr/ability options (--device cuda ...)


@dataclasses.dataclass(frozen=True)
class AblationConfig:
    name: str
    train_dir: Path                    # runs/stage1, runs/stage2, export/hf
    eval_dir: Path                     # retrieved/, dsr/, alignment/, over_refusal/, ability/ (index_no_toxic/ for iv)
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
    run1, run2 = RunFolder(cfg.train_dir / "runs" / "stage1"), RunFolder(cfg.train_dir / "runs" / "stage2")
    steps = []
    if cfg.tiny_world is not None:
        world_files = (cfg.tiny_world / "world.json", *eval_files(cfg).values())
        steps.append(Step("tiny world", [*py, "pipeline.tinyworld", "--out", str(cfg.tiny_world)],
                          skip_if=world_files, produces=cfg.tiny_world / "world.json"))
    steps += [Step(f"caption_index {r.config}", [*py, "stages.caption_index", "--config", str(r.config), *r.overrides])
             for r in cfg.indexes]
    steps += [Step(f"retrieval_join {r.config}", [*py, "stages.retrieval_join", "--config", str(r.config), *r.overrides])
              for r in cfg.training_joins]
    launch_env = {"PYTHON": python, **cfg.launch_env}
    # a run's exported projector is there exactly when the run finished
    steps.append(Step("stage1", ["bash", "launch/stage1.sh", *cfg.stage1.overrides, f"run_dir={run1.path}"],
                      {**launch_env, "CONFIG": str(cfg.stage1.config)}, (run1.projector,), run1.projector))
    steps.append(Step("stage2", ["bash", "launch/stage2.sh", *cfg.stage2.overrides, f"run_dir={run2.path}",
                                 f"model.projector={run1.projector}"],
                      {**launch_env, "CONFIG": str(cfg.stage2.config)}, (run2.projector,), run2.projector))
    model = export_dir(cfg)
    steps.append(Step("export", [*py, "pipeline.export", "--checkpoint", str(run2.checkpoints), "--out", str(model)],
                      skip_if=(model / "config.json",), produces=model / "config.json"))
    steps += _no_toxic_index_steps(cfg, py)
    for name, path in eval_files(cfg).items():
        joined = retrieved_dir(cfg) / name
        steps.append(_eval_join(cfg, py, name, path, joined))
        steps.append(_eval_tool(cfg, py, name, path, joined))
        # the toxic images' join carries their scene captions (caption_map): cos at every layer; a
        # join without captions (image_caption none) has nothing to align the pictures with
        if name == "dsr" and eval_join_caption(cfg, name) != "none":
            steps.append(Step("alignment", [
                *py, "pipeline.analysis.alignment", "--model", str(model), "--shards", str(joined),
                "--out", str(cfg.eval_dir / "alignment"), "--no-mlflow", "--include-toxic",
                *options_named(cfg.eval.args, ALIGNMENT_OPTIONS)],
                produces=cfg.eval_dir / "alignment" / "alignment.json"))
    return steps


def retrieved_dir(cfg: AblationConfig) -> Path:
    return cfg.eval.retrieved_dir or cfg.eval_dir / "retrieved"


def eval_files(cfg: AblationConfig) -> dict[str, Path]:
    """Eval data by output folder: dsr (toxic images), over_refusal (when configured), ability."""
    files = {"dsr": cfg.eval.toxic}
    if cfg.eval.benign_requests is not None:
        files["over_refusal"] = cfg.eval.benign_requests
    files["ability"] = cfg.eval.benign
    return files


def eval_join_caption(cfg: AblationConfig, name: str) -> str:
    """The eval join's image_caption mode for eval file `name`, after the ablation's overrides (the
    YAML as written: its inputs need not exist when the plan is made). The gpt turn of a DSR record
    is a refusal, never a caption of its picture: `answer` becomes `none` for the DSR files."""
    mode = (yaml.safe_load(Path(cfg.eval.join.config).read_text()) or {}).get("image_caption", "answer")
    for item in cfg.eval.join.overrides:
        key, _, value = item.partition("=")
        mode = value.strip() if key.strip() == "image_caption" else mode
    return "none" if mode == "answer" and name != "ability" else mode


def _eval_join(cfg: AblationConfig, py: list[str], name: str, data: Path, joined: Path) -> Step:
    """The eval file through the training images' retrieval join; it runs also for a model trained
    without retrieved text (ablation i), whose alignment still reads the join's shards."""
    image_root = cfg.eval.images or default_image_root(data)
    return Step(f"retrieval_join {name} data", [
        *py, "stages.retrieval_join", "--config", str(cfg.eval.join.config), *cfg.eval.join.overrides,
        f"image_caption={eval_join_caption(cfg, name)}", f"input={data}", f"image_root={image_root}",
        f"index_dir={cfg.eval.index_dir}", f"output_dir={joined}"], produces=joined / "manifest.parquet")


def _eval_tool(cfg: AblationConfig, py: list[str], name: str, data: Path, joined: Path) -> Step:
    tool = "ability" if name == "ability" else "dsr"
    images = ["--images", str(cfg.eval.images)] if cfg.eval.images is not None else []
    retrieved = ["--retrieved", str(joined), "--insert-retrieved"] if cfg.eval.insert_retrieved \
        else ["--no-insert-retrieved"]
    # The control runs the dsr tool (its pictures expect answers: the rate is over-refusal), whose
    # report would land on the training run's dsr/ metrics and replace the toxic DSR there: it
    # stays on disk (and in the suite's MLflow runs).
    own_report = ["--expect", "answer", "--no-mlflow"] if name == "over_refusal" else []
    out = cfg.eval_dir / name
    return Step(name, [*py, f"pipeline.eval.{tool}", "--model", str(export_dir(cfg)), "--data", str(data),
                       "--out", str(out), *images, *retrieved, *cfg.eval.args, *own_report],
                produces=out / "summary.json")


def options_named(args: list[str], names: tuple[str, ...]) -> list[str]:
    """The `--name value` / `--name=value` pairs of `args` whose name is one of `names`."""
    picked = []
    for position, arg in enumerate(args):
        if arg.split("=", 1)[0] in names:
            picked += [arg] if "=" in arg else args[position:position + 2]
    return picked


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


def evaluated(cfg: AblationConfig, seeds: list[int] | None) -> list[AblationConfig]:
    """What `--table` reads: the given seeds' folders; else the ablation's own eval_dir when it ran
    alone, or every `seed-<N>` folder a suite left in it (`make ablations`), one row each."""
    if seeds is None and not (cfg.eval_dir / "dsr").is_dir():
        seeds = sorted(int(p.name.removeprefix("seed-")) for p in cfg.eval_dir.glob("seed-*")
                       if p.name.removeprefix("seed-").isdigit())
    if not seeds:
        return [cfg]
    return [dataclasses.replace(for_seed(cfg, seed), name=f"{cfg.name} seed {seed}") for seed in seeds]


def table(rows: list[dict]) -> str:
    columns = list(rows[0])
    cell = lambda v: "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def for_seed(cfg: AblationConfig, seed: int) -> AblationConfig:
    """The ablation trained with `seed`, in `seed-<N>` subfolders of its train_dir and eval_dir
    (ablations sharing a train_dir share it per seed). The index without toxic texts (iv) does not
    depend on the seed and stays where eval.index_dir says: it is built once."""
    def seeded(stage: ConfigRun) -> ConfigRun:
        return dataclasses.replace(stage, overrides=[*stage.overrides, f"seed={seed}"])

    folder = f"seed-{seed}"
    return dataclasses.replace(cfg, train_dir=cfg.train_dir / folder, eval_dir=cfg.eval_dir / folder,
                               stage1=seeded(cfg.stage1), stage2=seeded(cfg.stage2))


def suite_plan(configs: list[AblationConfig], seeds: list[int], python: str = sys.executable) -> list[Step]:
    """Every ablation's plan for every seed, in order; a step that an earlier ablation already has
    (the tiny world, the index, the training shards, iii's training for iv) is kept once."""
    names = [cfg.name for cfg in configs]
    if len(set(names)) != len(names) or len(set(seeds)) != len(seeds):
        raise SystemExit(f"a suite needs distinct ablation names and seeds, got {names} and seeds {seeds}")
    steps, seen = [], set()
    for cfg in configs:
        for seed in seeds:
            for step in plan(for_seed(cfg, seed), python):
                identity = (tuple(step.argv), tuple(sorted(step.env.items())))
                if identity not in seen:
                    seen.add(identity)
                    steps.append(dataclasses.replace(step, name=f"{cfg.name} seed {seed}: {step.name}"))
    return steps


def suite_outputs(configs: list[AblationConfig], seeds: list[int]) -> dict[str, list[ablation_results.SeedOutputs]]:
    """Where each ablation and seed of a suite leaves its results, by ablation name."""
    outputs = {}
    for cfg in configs:
        seeded = [for_seed(cfg, seed) for seed in seeds]
        outputs[cfg.name] = [ablation_results.SeedOutputs(seed, one.eval_dir, export_dir(one),
                                                          configured_layers(one.stage2))
                             for seed, one in zip(seeds, seeded)]
    return outputs


def configured_layers(stage: ConfigRun) -> tuple[int, ...]:
    """`tga.layers` of a stage's YAML and overrides (the TGA default when neither sets them)."""
    raw = yaml.safe_load(Path(stage.config).read_text()) or {}
    layers = (raw.get("tga") or {}).get("layers")
    for item in stage.overrides:
        key, _, value = item.partition("=")
        if key.removeprefix("--") == "tga.layers":
            layers = yaml.safe_load(value)
    if layers is None:
        from pipeline.tga.loss import TGAConfig  # imports torch: only when the config is silent
        layers = TGAConfig().layers
    return tuple(int(layer) for layer in layers)


def run_suite(configs: list[AblationConfig], args: argparse.Namespace, command: str) -> dict:
    """Run the suite, write results.json/md/png into --out, log them to MLflow; returns the results."""
    run(suite_plan(configs, args.seeds))
    results = ablation_results.collect(suite_outputs(configs, args.seeds))
    files = ablation_results.write(args.out, results, seeds=args.seeds, command=command)
    print(f"wrote {', '.join(map(str, files))}", flush=True)
    if args.no_mlflow:
        print("MLflow: off (--no-mlflow); results are only on disk", flush=True)
    else:
        uri = args.mlflow_uri or embedded_tracking_uri(args.out)
        ablation_tracking.log_suite(uri, args.mlflow_experiment, results, files, seeds=args.seeds,
                                    command=command)
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.eval.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", type=Path, help="ablation file(s) (configs/ablations/...)")
    parser.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    parser.add_argument("--table", action="store_true", help="print the results of finished ablations as a table")
    suite = parser.add_argument_group("suite: several ablations, seeds, results files and MLflow")
    suite.add_argument("--suite", action="store_true", help="run every file in order, then write the results")
    suite.add_argument("--out", type=Path, default=None,
                       help="results.json, results.md, results.png (and the default MLflow store) go here")
    suite.add_argument("--seeds", type=int, nargs="+", default=None,
                       help="train every ablation once per seed (default: 0); put the ablation files after "
                            "another option or before --seeds")
    suite.add_argument("--mlflow-uri", default=None, help="tracking URI (default: sqlite:///OUT/mlflow.db)")
    suite.add_argument("--mlflow-experiment", default=ablation_tracking.DEFAULT_EXPERIMENT)
    suite.add_argument("--no-mlflow", action="store_true", help="write the results files only")
    return parser


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        configs = [load_config(AblationConfig, path) for path in args.configs]
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    if args.table:
        print(table([results(one) for cfg in configs for one in evaluated(cfg, args.seeds)]))
        return None
    if args.suite:
        args.seeds = args.seeds or [0]
        if args.out is None:
            parser.error("--suite needs --out (the folder for results.json, results.md, results.png)")
        if args.dry_run:
            run(suite_plan(configs, args.seeds), dry_run=True)
            return None
        return run_suite(configs, args, shlex.join(["python", "-m", "pipeline.eval.ablation", *argv]))
    if len(configs) > 1:
        parser.error("run one ablation at a time (several files only with --table or --suite)")
    if args.seeds is not None or args.out is not None or args.mlflow_uri is not None or args.no_mlflow:
        parser.error("--seeds, --out, --mlflow-uri and --no-mlflow are options of --suite")
    run(plan(configs[0]), dry_run=args.dry_run)
    return None


if __name__ == "__main__":
    main(sys.argv[1:])
