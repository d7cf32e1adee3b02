"""The training job: build config → distributed → model → data → engine → loop (torchtitan order).

Everything the loop calls has one job; the loop itself only decides *when*: when an epoch ends
(agreed by all ranks), when to log, checkpoint, or stop for a preemption signal.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import random
import sys
import time
from pathlib import Path

import deepspeed
import numpy as np
import torch

from pipeline.config import dump_yaml, flatten, to_dict
from pipeline.data.encode import SampleEncoder, collate
from pipeline.data.loader import batches_per_epoch, build_loader
from pipeline.model.assemble import apply_freeze, build_llava, projector_state_dict, save_projector
from pipeline.train import engine as ds_engine
from pipeline.train.checkpoint import Checkpointer
from pipeline.train.config import TrainConfig
from pipeline.train.distributed import any_rank, barrier, mean_over_ranks
from pipeline.train.flops import StepFlops, peak_flops_per_device
from pipeline.train.metrics import StepMeter
from pipeline.train.plots import layer_cosine_figure, save_png
from pipeline.train.preemption import PreemptionFlag, requeue_if_slurm, signal_names
from pipeline.train.rng import capture_rng_state, restore_rng_state
from pipeline.train.step import CaptionTargets, tga_forward
from pipeline.train.tracking import TRACKING_FILE, Tracker, git_commit

log = logging.getLogger("pipeline.train")


@dataclasses.dataclass
class TrainState:
    step: int = 0          # optimizer steps done
    epoch: int = 0
    samples: int = 0       # samples consumed on this rank
    run_id: str | None = None


def train(cfg: TrainConfig, preemption: PreemptionFlag | None = None) -> int:
    """Runs (or resumes) the job; returns the process exit code (0 also after a preemption save).
    `preemption`: a flag the entry point installed before its imports (default signals)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    preemption = _preemption_flag(preemption, cfg.preemption_signals)
    dev = ds_engine.device_type(cfg.device)
    rank, _, world = ds_engine.init_distributed(dev)
    _seed_everything(cfg.seed + rank)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    ds_config = ds_engine.deepspeed_config(cfg, dev)
    zero3 = ds_engine.zero3_context(ds_config)  # noqa: F841 — must stay alive while loading
    assembled = build_llava(cfg.model, dev)
    trainable = apply_freeze(assembled.model, cfg.trainable)
    params = list(assembled.model.parameters())
    # Under ZeRO-3 the towers load straight into partitions: a rank holds ~1/world of them here.
    log.info("rank %d: model %.2fM parameters (%.2fM trainable tensors: %d), %.2fM materialised on this rank",
             rank, sum(getattr(p, "ds_numel", p.numel()) for p in params) / 1e6,
             sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad) / 1e6,
             len(trainable), sum(p.numel() for p in params) / 1e6)

    encoder = SampleEncoder(assembled.tokenizer, assembled.image_processor,
                            num_image_tokens=assembled.num_image_tokens,
                            template=cfg.prompt.template, insert_retrieved=cfg.prompt.insert_retrieved,
                            max_tokens=cfg.prompt.max_tokens,
                            pad_to_square=cfg.model.pad_to_square, image_token=cfg.model.image_token)
    pad_id = assembled.tokenizer.pad_token_id
    # flash-attention's varlen path takes one packed row; dense attention prefers several short ones
    attention = assembled.model.config.text_config._attn_implementation
    loader = build_loader(cfg.shards, rank=rank, world_size=world, cfg=cfg.loader, encode=encoder,
                          collate=functools.partial(collate, pad_id=pad_id, packed=cfg.loader.packing,
                                                    single_row=attention == "flash_attention_2"),
                          seed=cfg.seed)
    steps_per_epoch = batches_per_epoch(cfg.shards, world, cfg.loader) // cfg.optim.grad_accum
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    if total_steps < 1:
        raise SystemExit(f"{cfg.shards}: not enough samples for one optimizer step "
                         f"({world} ranks × batch {cfg.loader.batch_size} × accum {cfg.optim.grad_accum})")

    engine, _, _ = ds_engine.initialize(assembled.model, cfg, ds_config, total_steps, dev)
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, engine)
    state = TrainState()
    restored = checkpointer.load()
    if restored is not None:
        state = TrainState(**restored.client_state["train_state"])
        if restored.extra_per_rank is not None:  # None after a universal (world-size change) resume
            loader.load_state_dict(restored.extra_per_rank["loader"])
            restore_rng_state(restored.extra_per_rank["rng"])
        log.info("rank %d resumed at step %d (epoch %d)", rank, state.step, state.epoch)
    loader.dataset.set_epoch(state.epoch)

    tracking = cfg.tracking if cfg.tracking.run_name else dataclasses.replace(
        cfg.tracking, run_name=f"{cfg.stage}-{run_dir.resolve().name}")  # not MLflow's random name
    tracker = Tracker.open(tracking, run_dir, is_main=rank == 0, run_id=state.run_id,
                           params=flatten(cfg), tags={"stage": cfg.stage, "world_size": str(world),
                                                      "git_commit": git_commit()})
    state.run_id = tracker.run_id if rank == 0 else state.run_id
    if rank == 0:
        dump_yaml(cfg, run_dir / "config.yaml")
        (run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))
        if tracker.run_id:  # where the export and the evaluation tools find the training run
            (run_dir / TRACKING_FILE).write_text(json.dumps(
                {"tracking_uri": tracker.uri, "run_id": tracker.run_id}, indent=2) + "\n")
        if restored is None:
            tracker.log_artifact(run_dir / "config.yaml")
            tracker.log_artifact(run_dir / "deepspeed.json")
            print(f"[{cfg.stage}] MLflow: {tracker.ui_command or tracker.run_url}", flush=True)

    targets = CaptionTargets(cfg.tga.layers, cfg.caption_target_cache)
    use_tga = cfg.tga.align_on or cfg.tga.pair_on
    # Sample ledger (keys per step, per rank) and metrics.jsonl describe the checkpoint's lineage:
    # lines written after the checkpoint we resume from belong to a timeline that was lost.
    ledger = (run_dir / "samples").joinpath(f"rank{rank}.jsonl")
    ledger.parent.mkdir(exist_ok=True)
    _truncate_jsonl(ledger, keep_before_step=state.step)
    if rank == 0:
        _truncate_jsonl(run_dir / "metrics.jsonl", keep_before_step=state.step + 1)
    batches = iter(loader)
    batches_this_epoch, fresh_epoch = 0, restored is None  # a resumed epoch may already be spent
    meter = StepMeter(StepFlops.of(engine.module), peak_flops_per_device(engine.device, cfg.peak_tflops))
    history: list = []  # (step, {layer: cosine}) for the alignment plot
    exit_reason = "finished"
    engine.train()

    while state.step < total_steps:
        # Agree on a stop before touching the next batch: the saved loader state must not have
        # consumed a batch that was never trained on.
        if meter.micro_steps == 0 and preemption.should_stop():
            exit_reason = "preempted"
            break
        waited = time.perf_counter()
        batch = next(batches, None)
        meter.data_wait(time.perf_counter() - waited)
        if any_rank(batch is None)[0]:  # some rank ran dry: everyone starts the next epoch together
            if batches_this_epoch == 0 and fresh_epoch:
                raise RuntimeError(f"{cfg.shards}: a rank got no batch in epoch {state.epoch} "
                                   "(all its samples rejected?); see the skip warnings above")
            if batch is not None:
                log.info("rank %d: epoch %d ends on another rank; its last fetched batch (%d samples) "
                         "is left for the next epoch", rank, state.epoch, len(batch["keys"]))
            batches_this_epoch, fresh_epoch = 0, True
            state.epoch += 1
            loader.dataset.set_epoch(state.epoch)
            batches = iter(loader)
            continue
        batches_this_epoch += 1
        batch = _to_device(batch, engine.device)
        forwards = targets.forwards
        loss, parts = tga_forward(engine, batch, targets, state.step / total_steps, cfg.tga, use_tga)
        engine.backward(loss)
        engine.step()
        meter.micro(batch, parts, caption_forward=targets.forwards > forwards)
        state.samples += len(batch["keys"])
        with ledger.open("a") as f:
            f.write(json.dumps({"step": state.step, "keys": batch["keys"]}) + "\n")
        if meter.micro_steps < cfg.optim.grad_accum:
            continue
        state.step += 1
        _log_step(tracker, meter, engine, state, world, cfg, run_dir, rank, history)
        meter.reset()
        if checkpointer.is_due(state.step) and state.step < total_steps:
            _save(checkpointer, state, loader)

    _save(checkpointer, state, loader)
    if exit_reason == "preempted":
        log.warning("rank %d: preemption signal: checkpointed step %d, exiting", rank, state.step)
        tracker.close("KILLED")
        if rank == 0:
            requeue_if_slurm()
        return 0
    _export(engine, cfg, run_dir, rank, tracker)
    tracker.close("FINISHED")
    if rank == 0:
        print(f"[{cfg.stage}] done: {state.step} steps, run folder {run_dir}", flush=True)
    return 0


def _save(checkpointer: Checkpointer, state: TrainState, loader) -> None:
    checkpointer.save(state.step, {"train_state": dataclasses.asdict(state)},
                      {"loader": loader.state_dict(), "rng": capture_rng_state()})


def _log_step(tracker, meter, engine, state, world, cfg, run_dir, rank, history) -> None:
    if state.step % cfg.log_every_steps and state.step != 1:
        return
    metrics = mean_over_ranks(meter.report())
    for name in ("samples_per_second", "tokens_per_second"):
        metrics[name] *= world  # mean of per-rank rates → global rate
    metrics["lr"] = engine.get_lr()[0]
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    if rank != 0:
        return
    tracker.log_metrics(metrics, step=state.step)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": state.step, **metrics}) + "\n")
    cosines = {int(k.split("/")[1]): v for k, v in metrics.items() if k.startswith("cos_layer/")}
    if cosines:
        history.append((state.step, cosines))
    if cosines and (cfg.tracking.plot_due(state.step) or state.step == 1):
        figure = layer_cosine_figure(cosines, step=state.step, history=history)
        path = save_png(figure, run_dir / "plots" / f"alignment_step{state.step:07d}.png")
        tracker.log_artifact(path, "plots")


def _export(engine, cfg: TrainConfig, run_dir: Path, rank: int, tracker) -> None:
    """Stage 1's product: the projector weights (gathered from ZeRO-3 partitions)."""
    projector = engine.module.model.multi_modal_projector
    with deepspeed.zero.GatheredParameters(list(projector.parameters()), modifier_rank=None):
        if rank == 0:
            state = {f"multi_modal_projector.{k}": v for k, v in projector.state_dict().items()}
            path = run_dir / "export" / "projector.safetensors"
            path.parent.mkdir(exist_ok=True)
            save_projector(projector_state_dict(state), path)
            tracker.log_artifact(path, "export")
    barrier()


def _truncate_jsonl(path: Path, keep_before_step: int) -> None:
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines()
             if line and json.loads(line)["step"] < keep_before_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _preemption_flag(early: PreemptionFlag | None, signals: list[str]) -> PreemptionFlag:
    """The flag for the configured signals, keeping a signal the early (default) flag caught."""
    if early is not None and set(early.signals) == set(signal_names(signals)):
        return early
    if early is not None:
        early.restore()
    flag = PreemptionFlag(signals)
    if early is not None and early.is_set:
        flag.received = early.received
    return flag


def main(cfg: TrainConfig, preemption: PreemptionFlag | None = None) -> None:
    preemption = _preemption_flag(preemption, cfg.preemption_signals)
    code = train(cfg, preemption)
    preemption.ignore_from_now()  # finished or checkpointed: a late signal must not fail the job
    sys.exit(code)
