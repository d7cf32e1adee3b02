"""The training loop: one optimizer step after another (pipeline/train/step.py's train_step), log,
save when due, stop on an agreed preemption. It only decides *when*; pipeline/train/job.py builds
what it drives, pipeline/train/cli.py runs it in the rank's process.
"""
from __future__ import annotations

import functools
import logging
import time

import deepspeed

from pipeline.data.batch import Batch
from pipeline.model.assemble import projector_weights, save_projector
from pipeline.train.config import TrainConfig
from pipeline.train.distributed import barrier
from pipeline.train.epochs import AgreedEpochs
from pipeline.train.flops import StepFlops, peak_flops_per_device
from pipeline.train.job import Job, build_job
from pipeline.train.metrics import COSINE, StepMeter, step_line
from pipeline.train.plots import layer_cosine_figure, save_png
from pipeline.train.preemption import PreemptionFlag, requeue_if_slurm
from pipeline.train.step import train_step

log = logging.getLogger("pipeline.train")


def train(cfg: TrainConfig, preemption: PreemptionFlag) -> int:
    """Runs (or resumes) the job; returns the process exit code (0 also after a preemption save)."""
    job = build_job(cfg)
    state, engine = job.state, job.engine
    meter = StepMeter(StepFlops.of(engine.module, caption_layers=job.caption_targets.depth),
                      peak_flops_per_device(engine.device, cfg.peak_tflops))
    epochs = AgreedEpochs(job.loader, state, rank=job.rank, resumed=job.resumed, data=cfg.shards or "data")
    history: list = []  # (step, {layer: cosine}) for the alignment plot
    progress = (time.perf_counter(), state.step)
    engine.train()
    preempted = False
    # A stop is agreed before the next batch is touched: the saved loader state then holds no
    # batch that was fetched but never trained on.
    while state.step < job.total_steps and not (preempted := preemption.should_stop()):
        train_step(engine, meter.timed(epochs.next_batch), job.caption_targets, state.step / job.total_steps,
                   cfg.tga, cfg.optim.grad_accum, functools.partial(_record_micro_step, job, meter))
        state.step += 1
        _log_step(job, meter, history, progress)
        meter.reset()
        job.checkpointer.save(state.step, last_step=state.step == job.total_steps)
    if preempted:
        job.checkpointer.save(state.step, last_step=True)
    return _finish(job, preempted)


def _record_micro_step(job: Job, meter: StepMeter, batch: Batch, parts: dict, caption_forward_ran: bool) -> None:
    meter.micro(batch, parts, caption_forward_ran=caption_forward_ran)  # the host batch: no device sync
    job.datasets.add(batch)
    job.run.append_ledger(job.rank, job.state.step, batch.keys)


def _log_step(job: Job, meter: StepMeter, history: list, progress: tuple[float, int]) -> None:
    """`progress`: (start time, step) of this process, for the printed line's ETA."""
    step, cfg = job.state.step, job.cfg
    log_due = step % cfg.log_every_steps == 0 or step == 1
    if not (log_due or cfg.tracking.print_due(step)):
        return
    metrics = meter.report_over_ranks(job.world)
    metrics["lr"] = job.engine.get_lr()[0]
    if len(cfg.datasets) > 1:
        metrics.update(job.datasets.report_over_ranks())
    grad_norm = job.engine.get_global_grad_norm()
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    if job.rank != 0:
        return
    if cfg.tracking.print_due(step):
        started, first_step = progress
        print(step_line(cfg.stage, step, job.total_steps, metrics, time.perf_counter() - started,
                        step - first_step), flush=True)
    if not log_due:
        return
    job.tracker.log_metrics(metrics, step=step)
    job.run.append_metrics(step, metrics)
    cosines = {int(k[len(COSINE):]): v for k, v in metrics.items() if k.startswith(COSINE)}
    if cosines:
        history.append((step, cosines))
    if cosines and (cfg.tracking.plot_due(step) or step == 1):
        path = save_png(layer_cosine_figure(cosines, step=step, history=history), job.run.plot(step))
        job.tracker.log_artifact(path, "plots")


def _finish(job: Job, preempted: bool) -> int:
    if preempted:
        log.warning("rank %d: preemption signal: checkpointed step %d, exiting", job.rank, job.state.step)
        job.tracker.close("KILLED")
        if job.rank == 0:
            requeue_if_slurm()
        return 0
    _export_projector(job)
    job.tracker.close("FINISHED")
    if job.rank == 0:
        print(f"[{job.cfg.stage}] done: {job.state.step} steps, run folder {job.run.path}", flush=True)
    return 0


def _export_projector(job: Job) -> None:
    """Stage 1's product: the projector weights (gathered from ZeRO-3 partitions)."""
    projector = job.engine.module.model.multi_modal_projector
    with deepspeed.zero.GatheredParameters(list(projector.parameters()), modifier_rank=None):
        if job.rank == 0:
            job.run.export.mkdir(exist_ok=True)
            save_projector(projector_weights(projector), job.run.projector)
            job.tracker.log_artifact(job.run.projector, "export")
    barrier()
