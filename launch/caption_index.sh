#!/usr/bin/env bash
#SBATCH --job-name=tga-caption-index
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
# Caption index: CLIP text embeddings of the caption corpus (one GPU) + the faiss index (CPU, RAM
# as configured in index.current_memory). Runs as either of:
#   sbatch launch/caption_index.sh [key.sub=value ...]     (mkdir -p logs first: Slurm writes there)
#   bash launch/caption_index.sh [key.sub=value ...]
# Overridable variables:
#   CONFIG (configs/caption_index.yaml)  PYTHON (.venv/bin/python)  REPO (submit dir / this checkout)
#   RETRIEVAL_PYTHON (the config's retrieval_python; default .retrieval-venv/bin/python)
set -euo pipefail
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$REPO"
CONFIG=${CONFIG:-configs/caption_index.yaml}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
ARGS=(--config "$CONFIG")
[ -n "${RETRIEVAL_PYTHON:-}" ] && ARGS+=("retrieval_python=$RETRIEVAL_PYTHON")
exec "$PYTHON" -m stages.caption_index "${ARGS[@]}" "$@"
