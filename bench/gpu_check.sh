#!/usr/bin/env bash
# One GPU check (bench/README.md, "gpu_check"): stage-1 and stage-2 ZeRO-3 steps of a ~1B Llava with the
# flash path and bf16 on one GPU: flash against SDPA, packed against padded, TGA against plain, and with
# --lora configs/stage2_lora.yaml's model, in a few minutes, with no downloads. On a machine without an
# NVIDIA GPU it says so and exits 0.
#
#   bash bench/gpu_check.sh [--attention sdpa|flash|both] [--lora]   # on a GPU node, from anywhere
#   srun -n 1 --gres=gpu:1 bash bench/gpu_check.sh --lora
#   bash bench/gpu_check.sh --prepare    # set up the Python (wheelhouse route) and import; no GPU needed
#
# Which Python: PYTHON if set; else this checkout's .venv (make env); else, on a box that has a CUDA
# torch but no network, the wheelhouse route: a venv with --system-site-packages over BOX_PYTHON (so
# its torch is used), the wheels of bench/gpu_wheelhouse.sh installed into it with --no-index.
# Variables (all optional):
#   PYTHON             the interpreter that runs the check (default: .venv/bin/python of this checkout)
#   GPU_WHEELHOUSE     the wheelhouse route's wheels (default: bench/wheelhouse of this checkout)
#   BOX_PYTHON         the box's Python, the one with its CUDA torch (default: python3)
#   GPU_CHECK_VENV     the wheelhouse route's venv, reused while the wheelhouse and BOX_PYTHON stay the
#                      same (default: ${TMPDIR:-/tmp}/tga-gpu-check-venv)
#   GPU_CHECK_TIMEOUT  wall-clock limit in seconds (default 480); the check stops there, exit 124
#   CUDA_VISIBLE_DEVICES  which GPU (the check uses the first visible one)
# Other arguments go to bench/gpu_check.py (--attention, --lora, --steps, --peak-tflops, ...; --help).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LIMIT=${GPU_CHECK_TIMEOUT:-480}
prepare=0 args=()
for arg in "$@"; do
  if [[ $arg == --prepare ]]; then prepare=1; else args+=("$arg"); fi
done

if ((!prepare)) && ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi lists none), so there is nothing to check on this machine."
  echo "Run it on a GPU node, e.g. srun -n 1 --gres=gpu:1 bash bench/gpu_check.sh ${args[*]} (the CPU version of"
  echo "the same steps: PYTHONPATH=. .venv/bin/python bench/gpu_check.py --device cpu --tiny --attention both --lora)."
  exit 0
fi

# Sets PYTHON to the wheelhouse route's venv, built when the wheelhouse or BOX_PYTHON changed.
from_wheelhouse() {
  local wheelhouse=${GPU_WHEELHOUSE:-$REPO/bench/wheelhouse} box=${BOX_PYTHON:-python3}
  local venv=${GPU_CHECK_VENV:-${TMPDIR:-/tmp}/tga-gpu-check-venv} started=$SECONDS stamp
  if ! compgen -G "$wheelhouse/*.whl" >/dev/null; then
    echo "gpu_check: no Python for the check: neither $REPO/.venv (make env; README, 'Installing on a CUDA" \
         "cluster') nor wheels in $wheelhouse (bash bench/gpu_wheelhouse.sh where there is network, then copy" \
         "the folder here). Or set PYTHON." >&2
    exit 2
  fi
  if ! "$box" -c "import torch" 2>/dev/null; then
    echo "gpu_check: $box has no torch; the wheelhouse route runs on the box's own torch (BOX_PYTHON names" \
         "the Python that has it)." >&2
    exit 2
  fi
  stamp=$( (cd "$wheelhouse" && ls ./*.whl; command -v "$box") | sha256sum | cut -c1-12)
  if [[ $(cat "$venv/.wheelhouse" 2>/dev/null) != "$stamp" ]]; then
    rm -rf "$venv"
    "$box" -m venv --system-site-packages "$venv"
    # the wheel files themselves, so their versions win over any the box has; torch stays the box's
    "$venv/bin/python" -m pip install --quiet --no-index --find-links "$wheelhouse" "$wheelhouse"/*.whl
    echo "$stamp" > "$venv/.wheelhouse"
    echo "gpu_check: $venv set up from $wheelhouse over $box's torch in $((SECONDS - started)) s"
  fi
  PYTHON=$venv/bin/python
}

if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else from_wheelhouse; fi
fi
if [[ ! -x $PYTHON ]] && ! command -v "$PYTHON" >/dev/null; then
  echo "gpu_check: no Python at $PYTHON (PYTHON)" >&2
  exit 2
fi

cd "$REPO"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # everything is built locally; a download is a bug
export TOKENIZERS_PARALLELISM=false
if ((prepare)); then
  exec "$PYTHON" bench/gpu_check.py --imports-only
fi
status=0
timeout -k 30 "$LIMIT" "$PYTHON" bench/gpu_check.py --device cuda "${args[@]}" || status=$?
if [[ $status == 124 || $status == 137 ]]; then
  echo "gpu_check: stopped after the ${LIMIT} s limit (GPU_CHECK_TIMEOUT); the lines above show how far it got." >&2
fi
exit "$status"
