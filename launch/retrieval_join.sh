#!/usr/bin/env bash
#SBATCH --job-name=tga-retrieval-join
#SBATCH --array=0-7
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%A_%a.out
# Retrieval join as a Slurm job array: array task i of N packs, embeds and retrieves slice i of the
# input (config slice.index=i slice.count=N); the last task to finish merges manifest/rejects/stats.
# Array ids must run 0..N-1. Shard names depend on the input only, so any N gives the same dataset.
# Rerun failed tasks alone with the original N: `SLICE_COUNT=8 sbatch --array=3,5 launch/retrieval_join.sh`
# (finished slices are skipped anyway).
# Runs as either of:
#   sbatch [--array=0-N-1] launch/retrieval_join.sh [key.sub=value ...]   (mkdir -p logs first)
#   bash launch/retrieval_join.sh [key.sub=value ...]                      one slice: everything
# Overridable variables:
#   CONFIG (configs/retrieval_join.yaml)  PYTHON (.venv/bin/python)  REPO (submit dir / this checkout)
#   SLICE_INDEX (the array task id, else 0)  SLICE_COUNT (the array's task count, else 1)
#   RETRIEVAL_PYTHON (the config's retrieval_python; default .retrieval-venv/bin/python)
set -euo pipefail
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$REPO"
CONFIG=${CONFIG:-configs/retrieval_join.yaml}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
SLICE_INDEX=${SLICE_INDEX:-${SLURM_ARRAY_TASK_ID:-0}}
SLICE_COUNT=${SLICE_COUNT:-${SLURM_ARRAY_TASK_COUNT:-1}}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
ARGS=(--config "$CONFIG" "slice.index=$SLICE_INDEX" "slice.count=$SLICE_COUNT")
[ -n "${RETRIEVAL_PYTHON:-}" ] && ARGS+=("retrieval_python=$RETRIEVAL_PYTHON")
echo "[launch] retrieval_join slice $SLICE_INDEX of $SLICE_COUNT (${SLURM_JOB_ID:+job $SLURM_JOB_ID, }config $CONFIG)"
exec "$PYTHON" -m stages.retrieval_join "${ARGS[@]}" "$@"
