"""Checkpoints that are complete or invisible: DeepSpeed ZeRO-3 shards, per-rank state, a COMPLETE marker.

Layout of `<run_dir>/checkpoints/`:

    global_step<N>/
        zero_pp_rank_<r>_mp_rank_00_optim_states.pt   DeepSpeed: rank r's ZeRO-3 partition of the
                                                      trained parameters (fp32 weights, optimizer
                                                      moments); frozen ones are not saved
        zero_pp_rank_<r>_mp_rank_00_model_states.pt   DeepSpeed: shapes, scheduler and, as its
                                                      client_state, our global state (the same
                                                      on every rank: step, epoch, run id)
        rank_<r>.pt    our per-rank state: what only rank r knows (data-loader position, RNG states)
        COMPLETE       JSON {step, world_size, time, tag}, written by rank 0 after every rank wrote
    latest             "global_step<N>" of the newest complete checkpoint (DeepSpeed's format)

The checkpointer is handed the objects that resume once, as `Stateful`s (`state_dict()` /
`load_state_dict()`, torchtitan's pattern): `save(step)` and `load()` gather and restore them.

A save is atomic by ordering: every rank writes its files, a barrier, then rank 0 writes COMPLETE
and replaces `latest` (tmp file + os.replace). A rank killed at any point leaves a folder without
COMPLETE, which is never loaded, and `latest` still names the previous checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from pipeline.atomic import atomic_path
from pipeline.train.distributed import barrier, rank_and_world

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"global_step(\d+)")
# Our client state sits under one key of DeepSpeed's model-states file, so no name of ours can
# shadow one of DeepSpeed's own keys ("module", "lr_scheduler", "global_steps", ...).
_CLIENT_KEY = "pipeline_client_state"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from: the message names the folder and the fix."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500                 # optimizer steps between periodic saves
    keep_last: int = 3                     # newest complete checkpoints kept
    keep_every: int = 0                    # also keep those whose step is a multiple of this; 0 = off
    resume: Literal["auto", "never"] = "auto"  # auto: continue from `latest` when there is one
    resume_step: int | None = None         # resume from this complete step instead of `latest`

    def __post_init__(self):
        if self.every_steps < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1, got {self.every_steps}")
        if self.keep_last < 1:
            raise ValueError("checkpoint.keep_last must be >= 1 (the checkpoint to resume from), "
                             f"got {self.keep_last}")
        if self.keep_every < 0:
            raise ValueError(f"checkpoint.keep_every must be >= 0 (0 = off), got {self.keep_every}")
        if self.resume_step is not None and self.resume_step < 1:
            raise ValueError(f"checkpoint.resume_step must be a saved step >= 1, got {self.resume_step}")
        if self.resume_step is not None and self.resume == "never":
            raise ValueError("checkpoint.resume_step is set but checkpoint.resume is 'never'")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    # False only after a universal-checkpoint resume on a different world size (see load()).
    rank_state: bool


def step_tag(step: int) -> str:
    return f"global_step{step}"


def step_of(name: str) -> int | None:
    """The step of a folder name `global_step<N>`, else None."""
    match = _TAG.fullmatch(name)
    return int(match.group(1)) if match else None


def saved_steps(ckpt_dir: str | Path, complete: bool = True) -> list[int]:
    """Sorted steps of the `global_step<N>` folders that have (or, complete=False, lack) COMPLETE."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for child in ckpt_dir.iterdir():
        step = step_of(child.name)
        if step is not None and child.is_dir() and (child / COMPLETE).is_file() == complete:
            steps.append(step)
    return sorted(steps)


def latest_complete_step(ckpt_dir: str | Path) -> int | None:
    """The step `latest` names if that checkpoint is complete, else the newest complete one."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        step = step_of(name)
        if step is not None and (ckpt_dir / name / COMPLETE).is_file():
            return step
        log.warning("%s names '%s', which is not a complete checkpoint; using the newest complete one",
                    pointer, name)
    steps = saved_steps(ckpt_dir)
    return steps[-1] if steps else None


def step_to_resume(ckpt_dir: str | Path, cfg: CheckpointConfig) -> int | None:
    """The step a run with `cfg` resumes from in `ckpt_dir` (None: it starts fresh), or a
    CheckpointError when the two disagree. The resume and the stage entry's preflight both ask here."""
    ckpt_dir = Path(ckpt_dir)
    complete = saved_steps(ckpt_dir)
    if cfg.resume == "never":
        if complete:
            raise CheckpointError(
                f"checkpoint.resume is 'never' but {ckpt_dir} holds checkpoints of an earlier run (steps "
                f"{complete}); a fresh start would mix with them. Use a new run folder, delete that folder, "
                "or set checkpoint.resume=auto")
        return None
    if cfg.resume_step is None:
        return latest_complete_step(ckpt_dir)
    if cfg.resume_step not in complete:
        raise CheckpointError(f"checkpoint.resume_step={cfg.resume_step}: {ckpt_dir / step_tag(cfg.resume_step)} "
                              f"is not a complete checkpoint; complete steps: {complete or 'none'}")
    return cfg.resume_step


def read_marker(step_dir: str | Path) -> dict[str, Any]:
    path = Path(step_dir) / COMPLETE
    try:
        marker = json.loads(path.read_text())
        int(marker["world_size"]), int(marker["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: not a readable COMPLETE marker ({err}); delete {path.parent} "
                              "to resume from the previous checkpoint") from None
    return marker


def retained_steps(complete: list[int], newest: int, keep_last: int, keep_every: int) -> set[int]:
    """Steps to keep after `newest` was saved: the last `keep_last` and every multiple of `keep_every`.

    Steps above `newest` are left from before a forced `resume_step`: retention leaves them alone
    and the run overwrites each one when it reaches that step.
    """
    older = sorted(step for step in complete if step <= newest)
    keep = set(older[-keep_last:])
    if keep_every:
        keep |= {step for step in older if step % keep_every == 0}
    return keep | {step for step in complete if step > newest}


def export_full_state_dict(ckpt_dir: str | Path, step: int) -> dict[str, torch.Tensor]:
    """Every weight a complete ZeRO checkpoint holds, as fp32 tensors (frozen ones too, if it was
    saved with them). Materialises the whole model at once: exports use `trained_weights`."""
    _require_complete(ckpt_dir, step)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # slow import

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=step_tag(step))


def trained_weights(ckpt_dir: str | Path, step: int) -> dict[str, Any]:
    """The trained parameters and persistent buffers of a complete ZeRO checkpoint, consolidated
    lazily: name → an object with `.shape` whose `.contiguous()` returns the fp32 tensor.

    DeepSpeed memory-maps the fp32 master partitions and, in lazy mode, gathers one tensor per
    `.contiguous()`: a caller that converts and drops tensor by tensor holds one tensor, not a
    second copy of the model. Frozen parameters are skipped even where an older checkpoint holds
    them (they equal the base model folders'); such a checkpoint still costs reading them once,
    because DeepSpeed loads each rank's model-states file whole.
    """
    _require_complete(ckpt_dir, step)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # slow import

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=step_tag(step),
                                                    exclude_frozen_parameters=True, lazy_mode=True)


def _require_complete(ckpt_dir: str | Path, step: int) -> None:
    step_dir = Path(ckpt_dir) / step_tag(step)
    if not (step_dir / COMPLETE).is_file():
        raise CheckpointError(f"{step_dir}: not a complete checkpoint (no {COMPLETE} marker); "
                              f"complete steps in {ckpt_dir}: {saved_steps(ckpt_dir) or 'none'}")


class Checkpointer:
    """Saves and restores a DeepSpeed engine plus our state objects under `ckpt_dir`.

    `global_state`: objects whose state is the same on every rank (stored once per rank by
    DeepSpeed, restored from this rank's copy); `rank_state`: objects whose state is this rank's
    own. `save` and `load` are collectives: every rank calls them at the same step. The engine seam
    is `save_checkpoint`, `load_checkpoint` and `load_universal_checkpoint` of a DeepSpeedEngine.

    `trainable_only` (default: whenever the engine's model has a frozen parameter) leaves frozen
    parameters out of the files. A resume rebuilds them from their model folders exactly as the
    run's start did; under ZeRO-3 the trained weights come back from the optimizer's fp32
    partitions, and a saved frozen copy would only overwrite the rebuilt one with the same values.
    In stage 1 that copy is ~98% of every save (a 7B LLM: ~14 GB of bf16 fragments per save).
    """

    def __init__(self, ckpt_dir: str | Path, cfg: CheckpointConfig, engine, *,
                 global_state: dict[str, Stateful] | None = None, rank_state: dict[str, Stateful] | None = None,
                 trainable_only: bool | None = None):
        self.ckpt_dir = Path(ckpt_dir)
        self.cfg = cfg
        self.engine = engine
        self.global_state, self.rank_state = dict(global_state or {}), dict(rank_state or {})
        self.trainable_only = _has_frozen_parameters(engine) if trainable_only is None else trainable_only
        self._last_saved: int | None = None  # kept in memory: every rank must decide alike

    def save(self, step: int, last_step: bool = False) -> Path | None:
        """Write checkpoint `step` with the current state of every object when it is due: every
        `every_steps` steps, and at the run's `last_step` (its end, or a preemption stop). Returns
        its folder, or None when not due. Every rank calls it at the same steps (a collective)."""
        if not last_step and (step == 0 or step % self.cfg.every_steps):
            return None
        tag = step_tag(step)
        step_dir = self.ckpt_dir / tag
        rank, world = rank_and_world()
        if step == self._last_saved:
            if rank == 0:
                log.info("checkpoint %s already holds this state; not saving it again", step_dir)
            return step_dir
        started = time.monotonic()
        if rank == 0 and step_dir.exists():
            # Left by a save that was cut short, or by the run before a forced resume_step.
            log.warning("removing %s before saving step %d into it", step_dir, step)
            _remove(step_dir)
        barrier()
        global_state = {name: obj.state_dict() for name, obj in self.global_state.items()}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state={_CLIENT_KEY: global_state},
                                    save_latest=False, exclude_frozen_parameters=self.trainable_only)
        with atomic_path(step_dir / f"rank_{rank}.pt") as tmp:
            torch.save({name: obj.state_dict() for name, obj in self.rank_state.items()}, tmp)
        barrier()  # from here on every rank's part is on disk
        if rank == 0:
            marker = {"step": step, "world_size": world, "tag": tag,
                      "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            _write_text(step_dir / COMPLETE, json.dumps(marker) + "\n")
            _write_text(self.ckpt_dir / LATEST, tag)
            self._apply_retention(step)
        self._last_saved = step
        if rank == 0:  # one line per save, not one per rank
            log.info("saved checkpoint %s in %.1f s", step_dir, time.monotonic() - started)
        return step_dir

    def load(self) -> Restored | None:
        """Restore the engine and every state object from the checkpoint to resume; None when the
        run starts fresh."""
        step = self._step_to_resume()
        if step is None:
            return None
        rank, world = rank_and_world()
        started = time.monotonic()
        step_dir = self.ckpt_dir / step_tag(step)
        saved_world = int(read_marker(step_dir)["world_size"])
        tag = self._engine_tag(step, saved_world, world)
        # not strict without the frozen parameters: their names are missing from the module state
        load_path, client_states = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag,
                                                               load_module_strict=not self.trainable_only)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {self.ckpt_dir / tag} (see its log above)")
        _restore(self.global_state, (client_states or {}).get(_CLIENT_KEY, {}), load_path)
        if saved_world == world:
            # Our own file from this run's ranks; it holds NumPy's RNG state, which weights_only refuses.
            path = step_dir / f"rank_{rank}.pt"
            _restore(self.rank_state, torch.load(path, map_location="cpu", weights_only=False), path)
        else:
            log.warning("per-rank state of %s (data position, RNG) belongs to %d ranks and is not restored "
                        "on %d: the data order from here on differs from an uninterrupted run",
                        step_dir, saved_world, world)
        if self.cfg.resume_step is not None and rank == 0:
            self._point_latest_at(step)
        self._last_saved = step
        log.info("resumed from %s in %.1f s", self.ckpt_dir / tag, time.monotonic() - started)
        return Restored(step=step, rank_state=saved_world == world)

    def _step_to_resume(self) -> int | None:
        step = step_to_resume(self.ckpt_dir, self.cfg)
        if self.cfg.resume != "never" and rank_and_world()[0] == 0:
            for unfinished in saved_steps(self.ckpt_dir, complete=False):
                log.warning("skipping %s: no %s marker (its save did not finish on every rank)",
                            self.ckpt_dir / step_tag(unfinished), COMPLETE)
            if step is None:
                log.info("no complete checkpoint in %s: starting at step 0", self.ckpt_dir)
        return step

    def _engine_tag(self, step: int, saved_world: int, world: int) -> str:
        """The folder DeepSpeed loads: the checkpoint itself, or its universal conversion."""
        if not self.engine.load_universal_checkpoint():
            if saved_world != world:
                raise CheckpointError(world_size_message(self.ckpt_dir, step, saved_world, world))
            return step_tag(step)
        tag = step_tag(step) + "_universal"
        if not (self.ckpt_dir / tag).is_dir():
            raise CheckpointError(
                f"the DeepSpeed config sets checkpoint.load_universal but {self.ckpt_dir / tag} does not "
                "exist; " + _conversion_hint(self.ckpt_dir, step) + " Checkpoints this run saves are "
                "regular ones: remove load_universal once it has saved one.")
        return tag

    def _point_latest_at(self, step: int) -> None:
        # A forced resume starts a new timeline: `latest` must name it, so that a crash before the
        # next save resumes here and not from a newer checkpoint of the abandoned one.
        newer = [s for s in saved_steps(self.ckpt_dir) if s > step]
        if newer:
            log.warning("resuming from step %d of %s although newer checkpoints exist (steps %s); "
                        "they are overwritten as the run reaches their steps", step, self.ckpt_dir, newer)
        _write_text(self.ckpt_dir / LATEST, step_tag(step))

    def _apply_retention(self, newest: int) -> None:
        keep = retained_steps(saved_steps(self.ckpt_dir), newest, self.cfg.keep_last, self.cfg.keep_every)
        for step in saved_steps(self.ckpt_dir):
            if step not in keep:
                log.info("retention: removing %s", self.ckpt_dir / step_tag(step))
                _remove(self.ckpt_dir / step_tag(step))
        # Older folders without COMPLETE are cut-short saves: never loadable, only disk usage.
        for step in saved_steps(self.ckpt_dir, complete=False):
            if step < newest:
                log.info("removing incomplete %s", self.ckpt_dir / step_tag(step))
                _remove(self.ckpt_dir / step_tag(step))


def _has_frozen_parameters(engine) -> bool:
    module = getattr(engine, "module", None)
    return module is not None and any(not p.requires_grad for p in module.parameters())


def world_size_message(ckpt_dir: Path, step: int, saved_world: int, world: int) -> str:
    return (f"{ckpt_dir / step_tag(step)} was written by {saved_world} ranks, this run has {world}. "
            "ZeRO-3 shards are split per rank and cannot be loaded by a different number of ranks. "
            f"Either resume with {saved_world} ranks, or " + _conversion_hint(ckpt_dir, step)
            + " The per-rank data position and RNG states cannot follow a new world size: the data "
            "order after such a resume differs from an uninterrupted run.")


def _conversion_hint(ckpt_dir: Path, step: int) -> str:
    source = ckpt_dir / step_tag(step)
    return ("convert it to a DeepSpeed universal checkpoint:\n"
            f"    {shlex.quote(sys.executable)} -m deepspeed.checkpoint.ds_to_universal --input_folder {source} "
            f"--output_folder {source}_universal\n"
            'then resume with "checkpoint": {"load_universal": true} in the DeepSpeed config.')


def _restore(objects: dict[str, Stateful], saved: dict[str, Any], source) -> None:
    missing = sorted(set(objects) - set(saved))
    if missing:
        raise CheckpointError(f"{source}: holds no state for {', '.join(missing)} (has: "
                              f"{', '.join(sorted(saved)) or 'nothing'}); it was written by other code")
    for name, obj in objects.items():
        obj.load_state_dict(saved[name])


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _remove(step_dir: Path) -> None:
    # The marker goes first: a removal cut short leaves an incomplete folder, never a false complete one.
    (step_dir / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(step_dir)
