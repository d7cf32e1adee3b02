#!/usr/bin/env bash
# One GPU check (bench/README.md, "gpu_check"): stage-1 and stage-2 ZeRO-3 steps of a ~1B Llava with
# flash-attention 2 and bf16 on one GPU, packed vs padded and TGA vs plain, in a few minutes, with no
# downloads. On a machine without an NVIDIA GPU it says so and exits 0.
#
#   bash bench/gpu_check.sh                      # on a GPU node, from anywhere
#   srun -n 1 --gres=gpu:1 bash bench/gpu_check.sh
#
# Variables (all optional):
#   PYTHON             the main environment's interpreter (default: .venv/bin/python of this checkout)
#   GPU_CHECK_TIMEOUT  wall-clock limit in seconds (default 480); the check stops there, exit 124
#   CUDA_VISIBLE_DEVICES  which GPU (the check uses the first visible one)
# Arguments go to bench/gpu_check.py (--steps, --stage1-batch, --peak-tflops, ...; --help).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
LIMIT=${GPU_CHECK_TIMEOUT:-480}

if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi lists none), so there is nothing to check on this machine."
  echo "Run it on a GPU node, e.g. srun -n 1 --gres=gpu:1 bash bench/gpu_check.sh (the CPU version of the same"
  echo "steps: $PYTHON bench/gpu_check.py --device cpu --tiny)."
  exit 0
fi
if [[ ! -x $PYTHON ]]; then
  echo "gpu_check: no Python at $PYTHON: build the environment on this node first (make env; README," \
       "'Installing on a CUDA cluster'), or set PYTHON." >&2
  exit 2
fi

cd "$REPO"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # everything is built locally; a download is a bug
export TOKENIZERS_PARALLELISM=false
status=0
timeout -k 30 "$LIMIT" "$PYTHON" bench/gpu_check.py --device cuda "$@" || status=$?
if [[ $status == 124 || $status == 137 ]]; then
  echo "gpu_check: stopped after the ${LIMIT} s limit (GPU_CHECK_TIMEOUT); the lines above show how far it got." >&2
fi
exit "$status"
