#!/usr/bin/env bash
#SBATCH --job-name=tga-stage1
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-gpu=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# Stage 1 (projector alignment + TGA). Runs as any of:
#   sbatch launch/stage1.sh [key.sub=value ...]      Slurm: srun, one rank per GPU on every node
#   bash launch/stage1.sh [key.sub=value ...]        one machine: all local GPUs (or CPU_RANKS CPU ranks)
#   deepspeed [--hostfile H] launch/stage1.sh [...]  the DeepSpeed launcher runs this file with python
# Overridable variables:
#   CONFIG (configs/stage1.yaml)  PYTHON (.venv/bin/python)  GPUS_PER_NODE (all visible GPUs)
#   CPU_RANKS (2, no GPU)  MASTER_ADDR / MASTER_PORT (from the allocation)  REPO (submit dir)
# The header above is a default: sbatch flags (-N 4, --time, --signal) override it. The warning
# signal must come well before the limit (Slurm may send it up to a minute early; a 7B save takes ~1-2 min).
"""":
STAGE_MODULE=stages.stage1_align DEFAULT_CONFIG=configs/stage1.yaml
source "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}/launch/_train.sh"
exit 0
: <<'pass'
"""
# Python: the DeepSpeed launcher runs this file as `python -u launch/stage1.sh --local_rank=N ...`.
# (For bash, everything below is an unused here-document that ends at the last line.)
import os, sys  # noqa: E401
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline.train.cli import run_from_launch_script  # noqa: E402
run_from_launch_script("stage1", default_config="configs/stage1.yaml")
pass
