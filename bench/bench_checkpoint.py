"""Checkpoint cost of stage 1 under DeepSpeed ZeRO-3: save / load seconds, size on disk, the share
of a run they take at the configured interval, and the time from process start to the first step
of a resumed run.

    PYTHONPATH=. .venv/bin/python bench/bench_checkpoint.py [--quick] [--world DIR] [--steps 8]

In-process part (a world of one rank, DS_ACCELERATOR=cpu): the tiny stage-1 job from
configs/tiny/stage1.yaml is built by the stage's own `build_job` (engine, loader, checkpointer,
tracker) and trained on tiny-world shards; after every step its `Checkpointer` saves (the loop's
own state objects: train state, loader state, RNG), then `Checkpointer.load` is timed on the newest
checkpoint. The same engine state is also saved with DeepSpeed's `exclude_frozen_parameters=True`
and loaded back, to size what the frozen LLM and vision tower add to every checkpoint.
Subprocess part: `python -m stages.stage1_align` resumes from a copy of that run folder and runs
one more step; resume-to-first-step is the wall time from its start to its first metrics.jsonl row
(the process is stopped there). Without --quick, fresh (not resumed) runs are timed the same way,
alternating with the resumed ones, as the baseline of what any start costs.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
# DeepSpeed JIT-builds its CPU shared-memory comm op (init_distributed) into torch's extension
# cache. One cache shared by several virtualenvs is rebuilt (a minute or more) whenever the last
# build came from another env, which would land in the timings: keep one cache per env.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import deepspeed  # noqa: E402
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from bench_tga_overhead import tiny_world  # noqa: E402  (sibling script: bench/ is sys.path[0])
from pipeline.config import load_config  # noqa: E402
from pipeline.train.checkpoint import Checkpointer, step_tag  # noqa: E402
from pipeline.train.config import TrainConfig  # noqa: E402
from pipeline.train.launch_env import apply_rank_environment  # noqa: E402
from pipeline.train.job import Job, build_job  # noqa: E402
from pipeline.train.step import tga_forward  # noqa: E402
from tests.conftest import write_training_shards  # noqa: E402
from tests.stage_runner import stage_overrides, start_stage, tail  # noqa: E402

TINY_CONFIG = "configs/tiny/stage1.yaml"
INTERVAL_CONFIGS = ("configs/stage1.yaml", "configs/tiny/stage1.yaml")
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*resumed from \S+ in [\d.]+ s")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def megabytes(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def train_and_save(job: Job, steps: int) -> tuple[list[float], list[float]]:
    """`steps` training steps, each followed by the job's real checkpoint save: (step seconds,
    save seconds). The job is what `pipeline.train.loop.train` builds before its loop."""
    job.engine.train()
    batches = iter(job.loader)
    step_seconds, save_seconds = [], []
    for _ in range(steps):
        started = time.perf_counter()
        batch = next(batches)
        loss, _ = tga_forward(job.engine, batch, job.caption_targets, job.state.step / job.total_steps,
                              job.cfg.tga)
        job.engine.backward(loss)
        job.engine.step()
        job.state.step += 1
        step_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        job.checkpointer.save(job.state.step, last_step=True)  # the loop's own state objects, so the stage can resume it
        save_seconds.append(time.perf_counter() - started)
    job.tracker.close("KILLED")  # what a preempted run leaves
    return step_seconds, save_seconds


def time_loads(job: Job, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        checkpointer = Checkpointer(job.run.checkpoints, job.cfg.checkpoint, job.engine,
                                    global_state=job.checkpointer.global_state,
                                    rank_state=job.checkpointer.rank_state)
        started = time.perf_counter()
        if checkpointer.load() is None:
            raise RuntimeError(f"{job.run.path}: no checkpoint to load")
        seconds.append(time.perf_counter() - started)
    return seconds


def projector_values(engine) -> list[torch.Tensor]:
    params = list(engine.module.model.multi_modal_projector.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


def exclude_frozen_comparison(engine, loader, targets, cfg: TrainConfig, out: Path, step: int) -> dict:
    """Save the current state with and without frozen parameters; load the slim one back after a
    further step changed the projector, and check the projector and the step counter return.
    The frozen weights stay those loaded from the model folders: a resume rebuilds them anyway."""
    tag = step_tag(step)
    result = {}
    for name, exclude in (("with_frozen", False), ("without_frozen", True)):
        started = time.perf_counter()
        engine.save_checkpoint(str(out / name), tag=tag, save_latest=False, exclude_frozen_parameters=exclude)
        result[f"{name}_save_s"] = time.perf_counter() - started
        result[f"{name}_bytes"] = folder_bytes(out / name / tag)
    saved, saved_steps = projector_values(engine), engine.global_steps
    batch = next(iter(loader))
    loss, _ = tga_forward(engine, batch, targets, 0.0, cfg.tga)
    engine.backward(loss)
    engine.step()
    if all(torch.equal(a, b) for a, b in zip(saved, projector_values(engine))):
        raise RuntimeError("the extra step did not change the projector: the load check would prove nothing")
    try:  # DeepSpeed's default (strict): the frozen weights are missing from the file
        engine.load_checkpoint(str(out / "without_frozen"), tag=tag)
        result["strict_load_error"] = None
    except RuntimeError as err:
        missing = re.findall(r'"([^"]+)"', str(err).split("Missing key(s) in state_dict:", 1)[-1])
        result["strict_load_error"] = f"RuntimeError, {len(missing)} frozen weights missing from the state dict"
    started = time.perf_counter()
    load_path, _ = engine.load_checkpoint(str(out / "without_frozen"), tag=tag, load_module_strict=False)
    result["without_frozen_load_s"] = time.perf_counter() - started
    restored = projector_values(engine)
    result["load_ok"] = (load_path is not None and engine.global_steps == saved_steps
                         and all(torch.equal(a, b) for a, b in zip(saved, restored)))
    # The export path (zero_to_fp32) on each: a slim checkpoint consolidates to the trained tensors only.
    for name in ("with_frozen", "without_frozen"):
        result[f"{name}_tensors"] = len(get_fp32_state_dict_from_zero_checkpoint(str(out / name), tag=tag))
    return result


def wait_for_step(run_dir: Path, step: int, proc, log: Path, timeout: float) -> float:
    """Wall-clock time at which metrics.jsonl first holds `step` (polled every 20 ms)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while True:
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                if line.endswith("}") and json.loads(line)["step"] == step:
                    return time.time()
        if proc.poll() is not None and proc.returncode != 0:
            raise RuntimeError(f"stage exited {proc.returncode} before step {step}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no step {step} within {timeout:.0f} s:\n{tail(log)}")
        time.sleep(0.02)


def time_stage_run(world, shards: Path, run_dir: Path, overrides: dict, first_step: int, log: Path) -> dict:
    """Start `python -m stages.stage1_align`; seconds from start to its first step and to the end of
    its checkpoint load (from its log). The run is stopped once that step is logged: what follows
    (final save, export) is not what this measures."""
    started = time.time()
    proc = start_stage("stages.stage1_align", TINY_CONFIG, stage_overrides(world, shards, run_dir, **overrides),
                       ranks=1, log=log)
    try:
        first = wait_for_step(run_dir, first_step, proc, log, timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the stage and nothing else
        proc.wait()
    result = {"to_first_step_s": first - started}
    for line in log.read_text(errors="replace").splitlines():
        match = _LOG_TIME.match(line)
        if match:
            logged = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            result["to_resumed_s"] = logged - started
    return result


def interval_steps() -> dict[str, int]:
    return {path: yaml.safe_load((REPO / path).read_text())["checkpoint"]["every_steps"]
            for path in INTERVAL_CONFIGS}


def report(cfg, step_s, save_s, load_s, sizes, slim, resumed: list[dict], fresh: list[dict]) -> None:
    step, save, load = (statistics.median(v) for v in (step_s, save_s, load_s))
    print(f"\ntiny stage-1 model under ZeRO-3, 1 CPU rank, batch {cfg.loader.batch_size}; medians of "
          f"{len(step_s)} steps / {len(save_s)} saves / {len(load_s)} loads")
    # First epoch: every batch holds new sample keys, so the caption-target cache never hits yet.
    print(f"step time (loader + forward + backward + optimizer, TGA text forward each step): {step:.4f} s")
    print(f"checkpoint save: {save:.3f} s   load (resume, in process): {load:.3f} s")
    print(f"checkpoint size on disk: {megabytes(sizes['total'])} (model states {megabytes(sizes['model'])}, "
          f"optimizer states {megabytes(sizes['optim'])}, per-rank loader/RNG {megabytes(sizes['rank'])})")
    for path, every in interval_steps().items():
        fraction = save / (every * step + save)
        print(f"save share of run at every_steps={every} ({path}): {fraction:.2%}")
    frozen = slim["with_frozen_bytes"] - slim["without_frozen_bytes"]
    print(f"exclude_frozen_parameters=True: {megabytes(slim['without_frozen_bytes'])} vs "
          f"{megabytes(slim['with_frozen_bytes'])} with frozen params ({megabytes(frozen)} = "
          f"{frozen / slim['with_frozen_bytes']:.1%} is frozen weights); save {slim['without_frozen_save_s']:.3f} s "
          f"vs {slim['with_frozen_save_s']:.3f} s; load {slim['without_frozen_load_s']:.3f} s, "
          f"projector and step restored: {'yes' if slim['load_ok'] else 'NO'}")
    print(f"  zero_to_fp32 consolidation: {slim['without_frozen_tensors']} tensors without frozen params, "
          f"{slim['with_frozen_tensors']} with (the full model)")
    strict = slim["strict_load_error"]
    print("  strict load (DeepSpeed's default; Checkpointer loads without frozen weights non-strictly): "
          + (f"fails: {strict}" if strict else "works"))
    to_first = statistics.median(r["to_first_step_s"] for r in resumed)
    line = f"resume-to-first-step: {to_first:.2f} s (median of {len(resumed)} resumed stage runs)"
    if all("to_resumed_s" in r for r in resumed):
        loaded = statistics.median(r["to_resumed_s"] for r in resumed)
        line += f"; start -> checkpoint loaded {loaded:.2f} s, loaded -> first step {to_first - loaded:.2f} s"
    print(line)
    if fresh:
        fresh_first = statistics.median(r["to_first_step_s"] for r in fresh)
        print(f"fresh-start-to-first-step: {fresh_first:.2f} s (median of {len(fresh)}; it also creates the "
              f"MLflow store and logs the config artifacts); resume minus fresh: {to_first - fresh_first:+.2f} s")


def checkpoint_sizes(step_dir: Path) -> dict[str, int]:
    files = [f for f in step_dir.iterdir() if f.is_file()]
    pick = lambda test: sum(f.stat().st_size for f in files if test(f.name))  # noqa: E731
    return {"total": folder_bytes(step_dir), "model": pick(lambda n: n.endswith("model_states.pt")),
            "optim": pick(lambda n: n.endswith("optim_states.pt")), "rank": pick(lambda n: n.startswith("rank_"))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, help="tiny world folder (generated there if missing; "
                        "default: the tests' cache)")
    parser.add_argument("--quick", action="store_true",
                        help="2 steps/saves/loads, 1 resumed stage run, no fresh-run baseline")
    parser.add_argument("--steps", type=int, default=8, help="training steps, each followed by a save")
    parser.add_argument("--loads", type=int, default=5, help="timed loads of the newest checkpoint")
    parser.add_argument("--stage-runs", type=int, default=3,
                        help="resumed (and fresh) stage processes timed to their first step")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.loads, args.stage_runs = 2, 2, 1
    if min(args.steps, args.loads, args.stage_runs, args.threads) < 1:
        parser.error("--steps, --loads, --stage-runs and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(args.threads)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING)
    print(f"machine load (1/5/15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}, "
          f"{os.cpu_count()} CPUs", flush=True)
    world = tiny_world(args.world)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        batch = yaml.safe_load((REPO / TINY_CONFIG).read_text())["loader"]["batch_size"]
        shards = write_training_shards(world, tmp / "shards", samples=batch * (args.steps + 2), per_shard=12)
        run_dir = tmp / "run"
        # Shared with the resumed subprocess: it must rebuild exactly this model, data and schedule.
        overrides = {"loader.num_workers": 0, "max_steps": args.steps + 1, "tracking.plot_every_steps": 0}
        cfg = load_config(TrainConfig, REPO / TINY_CONFIG,
                          stage_overrides(world, shards, run_dir, **overrides))
        apply_rank_environment()  # a world of one, as the stage entry prepares it
        job = build_job(cfg)
        step_s, save_s = train_and_save(job, args.steps)
        load_s = time_loads(job, args.loads)
        sizes = checkpoint_sizes(job.run.checkpoints / step_tag(args.steps))
        slim = exclude_frozen_comparison(job.engine, job.loader, job.caption_targets, cfg, tmp / "frozen",
                                         args.steps)
        resumed, fresh = [], []
        for run in range(args.stage_runs):  # alternating, so a load change hits both kinds alike
            copy = shutil.copytree(run_dir, tmp / f"resumed{run}")  # each resume starts from the same state
            resumed.append(time_stage_run(world, shards, copy, overrides, args.steps + 1,
                                          tmp / f"resumed{run}.log"))
            if not args.quick:
                fresh.append(time_stage_run(world, shards, tmp / f"fresh{run}", {**overrides, "max_steps": 1},
                                            1, tmp / f"fresh{run}.log"))
        report(cfg, step_s, save_s, load_s, sizes, slim, resumed, fresh)
    print(f"machine load after (1/5/15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
