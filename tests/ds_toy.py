"""A toy DeepSpeed ZeRO-3 training run for the checkpoint and preemption tests, and the launches that use it.

As a script (one process per rank, started by the DeepSpeed launcher with DS_ACCELERATOR=cpu):
a small regressor with dropout, fed by a seeded per-rank sample stream whose augmentation draws
from Python's and NumPy's global generators, so an exact resume needs the model, optimizer,
scheduler, data position and every RNG state. It runs pipeline.train's Checkpointer and
PreemptionFlag the way the training loop does and writes one JSON line per step and event to
`<run_dir>/traces/<trace>.rank<r>.jsonl` (losses as float.hex, so comparisons are bit-exact).
Fault injections (`--crash-*`, `--signal-*`) wrap the engine from outside, never the library.

As a module: `toy_scenarios(workdir)` runs the fixed set of launches the tests share (once per
pytest session, in the background: the `toy` fixture of tests/conftest.py).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import atomic_path
from pipeline.train.launch_env import free_port

REPO = Path(__file__).resolve().parents[1]

N_SAMPLES, N_FEATURES, MICRO_BATCH = 64, 8, 4


class ToyRegressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(N_FEATURES, 32)
        self.dropout = torch.nn.Dropout(0.2)  # draws from torch's global generator
        self.out = torch.nn.Linear(32, 1)

    def forward(self, x):
        return self.out(self.dropout(torch.relu(self.hidden(x)))).squeeze(-1)


class ToyStream:
    """Each epoch a seeded permutation of the samples; rank r reads positions r, r+W, r+2W, ..."""

    def __init__(self, rank: int, world: int, seed: int):
        table = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(N_SAMPLES, N_FEATURES, generator=table)
        self.targets = self.inputs @ torch.randn(N_FEATURES, generator=table)
        self.rank, self.world, self.seed = rank, world, seed
        self.epoch, self.cursor = 0, 0

    def next_batch(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        keys = []
        while len(keys) < MICRO_BATCH:
            order = torch.randperm(N_SAMPLES, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            mine = order[self.rank::self.world]
            if self.cursor >= len(mine):
                self.epoch, self.cursor = self.epoch + 1, 0
                continue
            keys.append(int(mine[self.cursor]))
            self.cursor += 1
        # Augmentation from the global Python and NumPy generators: only a restored RNG replays it.
        noise = torch.from_numpy(np.random.normal(0.0, 0.05, (MICRO_BATCH, N_FEATURES))).float()
        scale = random.uniform(0.9, 1.1)
        return keys, self.inputs[keys] * scale + noise, self.targets[keys] * scale

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]


def deepspeed_config(universal: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition every param
        "checkpoint": {"load_universal": universal},
        "steps_per_print": 10**9,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--trace", required=True, help="name of this launch's trace files")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--every-steps", type=int, default=2)
    parser.add_argument("--keep-last", type=int, default=2)
    parser.add_argument("--keep-every", type=int, default=4)
    parser.add_argument("--universal-after-refusal", action="store_true",
                        help='when the load is refused, retry with "checkpoint": {"load_universal": true}')
    parser.add_argument("--dump-weights", action="store_true",
                        help="rank 0 writes the gathered weights after the load and at the end")
    parser.add_argument("--crash-at-save", type=int, help="rank 1 SIGKILLs itself while saving this step, "
                        "after its DeepSpeed shards and rank 0's part are on disk")
    parser.add_argument("--signal-at-step", type=int, help="rank 1 sends itself SIGTERM after this step")
    parser.add_argument("--signal-during-save", type=int,
                        help="while saving this step every rank gets SIGTERM twice, rank 0's first one "
                        "while it is blocked in a collective")
    parser.add_argument("--scontrol", default="scontrol", help="command requeue_if_slurm runs")
    parser.add_argument("--slurm-job-id", help="SLURM_JOB_ID seen by requeue_if_slurm")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the DeepSpeed launcher")
    return parser.parse_args(argv)


def build_engine(seed: int, load_universal: bool):
    import deepspeed

    torch.manual_seed(seed)  # same initial weights on every rank
    model = ToyRegressor()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 5))
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=deepspeed_config(load_universal))
    return engine, scheduler


def main(argv=None) -> int:
    from pipeline.train.checkpoint import CheckpointConfig, CheckpointError, Checkpointer
    from pipeline.train.engine import init_distributed
    from pipeline.train.launch_env import apply_rank_environment
    from pipeline.train.preemption import PreemptionFlag, requeue_if_slurm
    from pipeline.train.rng import RNGState
    from pipeline.train.state import TrainState

    args = parse_args(argv)
    flag = PreemptionFlag()
    apply_rank_environment()
    rank, _, world = init_distributed("cpu")  # the stages' own set-up (it unlinks the shm buffers)
    logging.basicConfig(level=logging.INFO, format=f"[rank{rank}] %(name)s: %(message)s", force=True)
    trace_path = args.run_dir / "traces" / f"{args.trace}.rank{rank}.jsonl"
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    trace = trace_path.open("a")

    def record(**event):
        trace.write(json.dumps(event) + "\n")
        trace.flush()

    cfg = CheckpointConfig(every_steps=args.every_steps, keep_last=args.keep_last, keep_every=args.keep_every)
    progress, stream = TrainState(), ToyStream(rank, world, args.seed)

    def checkpointer_for(engine) -> Checkpointer:
        return Checkpointer(args.run_dir / "checkpoints", cfg, engine, global_state={"train_state": progress},
                            rank_state={"data": stream, "rng": RNGState()})

    def seed_generators():  # before the load: a resume overwrites these states, a fresh start keeps them
        random.seed(args.seed + rank)
        np.random.seed(args.seed + rank)
        torch.manual_seed(args.seed + rank)

    engine, scheduler = build_engine(args.seed, load_universal=False)
    checkpointer = checkpointer_for(engine)
    seed_generators()
    try:
        restored = checkpointer.load()
    except CheckpointError as err:
        print(f"CheckpointError: {err}", file=sys.stderr, flush=True)
        record(event="refused", message=str(err))
        if not args.universal_after_refusal:
            return 2
        engine, scheduler = build_engine(args.seed, load_universal=True)
        checkpointer = checkpointer_for(engine)
        seed_generators()
        restored = checkpointer.load()
    _inject_save_faults(engine, args, rank)
    if restored is not None:
        record(event="resumed", step=progress.step, restored_extra=restored.rank_state)
        if args.dump_weights:
            _dump_gathered_weights(engine, args.run_dir / f"weights_{args.trace}_loaded.pt", rank)

    while progress.step < args.steps:
        keys, inputs, targets = stream.next_batch()
        loss = torch.nn.functional.mse_loss(engine(inputs), targets)
        engine.backward(loss)
        engine.step()
        progress.step += 1
        record(step=progress.step, loss=float.hex(loss.item()), lr=float.hex(scheduler.get_last_lr()[0]),
               samples=keys)
        if progress.step == args.signal_at_step and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        local_flag = flag.is_set
        stop = flag.should_stop()
        checkpointer.save(progress.step, last_step=stop)
        if stop:
            environ = {"SLURM_JOB_ID": args.slurm_job_id} if args.slurm_job_id else {}
            requeued = requeue_if_slurm(environ, scontrol=args.scontrol)
            record(event="stopped", step=progress.step, local_flag=local_flag,
                   signals_received=flag.signals_received, requeued=requeued)
            return 0
    if args.dump_weights:
        _dump_gathered_weights(engine, args.run_dir / f"weights_{args.trace}_final.pt", rank)
    record(event="finished", step=progress.step)
    return 0


def _inject_save_faults(engine, args, rank: int) -> None:
    """Wrap engine.save_checkpoint (the Checkpointer's first write) with the requested fault. Every
    wait is on a file another rank writes, never on a timer: the order holds on a busy machine."""
    original = engine.save_checkpoint
    faults = args.run_dir / "faults"
    faults.mkdir(exist_ok=True)

    def save_checkpoint(save_dir, tag, **kwargs):
        signal_now = tag == f"global_step{args.signal_during_save}"
        if signal_now and rank == 0:
            # rank 1 signals us once we are inside the save, where DeepSpeed's first collective
            # holds us until rank 1 joins it, which it does only after signalling
            with atomic_path(faults / f"{tag}.rank0.pid") as tmp:  # rank 1 never reads half a file
                tmp.write_text(str(os.getpid()))
        elif signal_now:
            rank0_pid = int(_wait_for(faults / f"{tag}.rank0.pid").read_text())
            os.kill(rank0_pid, signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        result = original(save_dir, tag, **kwargs)
        if signal_now:
            os.kill(os.getpid(), signal.SIGTERM)
        if tag == f"global_step{args.crash_at_save}" and rank == 1:
            # Die only once rank 0 has written its part: the marker must still not appear.
            _wait_for(Path(save_dir) / tag / "rank_0.pt")
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    engine.save_checkpoint = save_checkpoint


def _wait_for(path: Path) -> Path:
    """Until another rank has (atomically) written `path`; the launcher ends us if that rank dies."""
    while not path.exists():
        time.sleep(0.01)
    return path


def _dump_gathered_weights(engine, path: Path, rank: int) -> None:
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        if rank == 0:
            torch.save({name: p.detach().clone() for name, p in params.items()}, path)


# ---------------------------------------------------------------- launches shared by the tests


@dataclasses.dataclass
class Launch:
    command: list[str]
    returncode: int
    output: str
    seconds: float


@dataclasses.dataclass
class Scenarios:
    reference: Path                # one uninterrupted 10-step run
    resumed: Path                  # the same run, crashed, resumed, preempted, resumed again
    launches: dict[str, Launch]
    files_after_crash: list[str]   # under resumed/checkpoints, right after the crash launch
    latest_after_crash: str
    requeue_log: Path              # what the scontrol recorder was called with

    def trace(self, run_dir: Path, name: str, rank: int) -> list[dict]:
        path = run_dir / "traces" / f"{name}.rank{rank}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def steps(self, run_dir: Path, name: str, rank: int) -> dict[int, dict]:
        """step → {"loss", "lr", "samples"} of one launch on one rank."""
        return {e["step"]: e for e in self.trace(run_dir, name, rank) if "loss" in e}

    def events(self, run_dir: Path, name: str, rank: int, event: str) -> list[dict]:
        return [e for e in self.trace(run_dir, name, rank) if e.get("event") == event]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def load(cls, path: Path) -> Scenarios:
        saved = json.loads(path.read_text())
        return cls(Path(saved["reference"]), Path(saved["resumed"]),
                   {name: Launch(**launch) for name, launch in saved["launches"].items()},
                   saved["files_after_crash"], saved["latest_after_crash"], Path(saved["requeue_log"]))

    def assert_succeeded(self, *names: str) -> None:
        for name in names:
            done = self.launches[name]
            assert done.returncode == 0, f"{' '.join(done.command)}\n{done.output[-4000:]}"


def launch(run_dir: Path, trace: str, *options: str, num_ranks: int = 2) -> Launch:
    """`deepspeed --num_gpus <num_ranks> tests/ds_toy.py ...`: CPU ranks talking over gloo."""
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks),
               "--master_port", str(free_port()), str(Path(__file__)),
               "--run-dir", str(run_dir), "--trace", trace, *options]
    return _run(command)


def universal_conversion_command(ckpt_dir: Path, step: int) -> list[str]:
    source = ckpt_dir / f"global_step{step}"
    return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
            "--input_folder", str(source), "--output_folder", f"{source}_universal",
            "--num_extract_workers", "1", "--num_merge_workers", "1"]


def toy_scenarios(workdir: Path) -> Scenarios:
    """Run the launches every multi-rank test reads (tests/conftest.py runs this once per session)."""
    reference, resumed = workdir / "reference", workdir / "resumed"
    requeue_log = workdir / "scontrol.log"
    recorder = workdir / "scontrol"
    recorder.parent.mkdir(parents=True, exist_ok=True)
    recorder.write_text(f'#!/bin/sh\necho "$@" >> "{requeue_log}"\n')
    recorder.chmod(0o755)
    # The uninterrupted reference runs beside the crash and the preemption (on 2 cores their
    # start-ups overlap); nothing of one run is in the other's folder.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as beside:
        uninterrupted = beside.submit(launch, reference, "reference", "--dump-weights")
        # rank 1 dies while saving step 6; steps 2 and 4 are complete
        launches = {"crash": launch(resumed, "crash", "--crash-at-save", "6")}
        ckpt_dir = resumed / "checkpoints"
        files_after_crash = sorted(str(p.relative_to(ckpt_dir)) for p in ckpt_dir.rglob("*") if p.is_file())
        latest_after_crash = (ckpt_dir / "latest").read_text()
        # resumes from 4; SIGTERM reaches rank 1 only, after step 7; two more land during that save
        launches["preempted"] = launch(resumed, "preempted", "--signal-at-step", "7", "--signal-during-save", "7",
                                       "--scontrol", str(recorder), "--slurm-job-id", "4242")
        launches["reference"] = uninterrupted.result()
    launches["finished"] = launch(resumed, "finished")
    launches["conversion"] = _run(universal_conversion_command(ckpt_dir, 10))
    # one rank: the plain load is refused, the universal one resumes step 10 and trains step 11
    launches["one_rank"] = launch(resumed, "one_rank", "--universal-after-refusal", "--dump-weights",
                                  "--steps", "11", num_ranks=1)
    return Scenarios(reference, resumed, launches, files_after_crash, latest_after_crash, requeue_log)


def _run(command: list[str]) -> Launch:
    # DeepSpeed's ZeRO optimizer check imports its Muon kernels, whose @torch.compile pulls in all of
    # inductor (~4 s per rank); nothing here compiles, so dynamo is switched off.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "TORCHDYNAMO_DISABLE": "1"}
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return Launch(command, done.returncode, done.stdout + done.stderr, time.monotonic() - started)


if __name__ == "__main__":
    code = main()
    from pipeline.train.distributed import shutdown

    shutdown()  # as the stages do: no process group left for interpreter exit to tear down
    sys.exit(code)
