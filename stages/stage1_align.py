"""Stage 1: projector alignment with the TGA loss (vision tower and LLM frozen).

    python -m stages.stage1_align --config configs/tiny/stage1.yaml [key.sub=value ...]
    deepspeed stages/stage1_align.py --config configs/stage1.yaml
    bash|sbatch launch/stage1.sh
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the DeepSpeed launcher: make `pipeline` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.train.preemption import PreemptionFlag  # noqa: E402  (stdlib only: imports in ms)


def cli(argv: list[str] | None = None) -> None:
    # Catch preemption signals before the heavy imports and the model load, which take long
    # enough under load for a Slurm warning to arrive (and kill us with the default action).
    preemption = PreemptionFlag()
    from pipeline.config import parse_args
    from pipeline.train.config import TrainConfig
    from pipeline.train.loop import main

    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    cfg = parse_args(TrainConfig, argv)
    if cfg.stage != "stage1":
        raise SystemExit(f"stage1_align: config has stage '{cfg.stage}', expected 'stage1'")
    main(cfg, preemption)


if __name__ == "__main__":
    cli()
