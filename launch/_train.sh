# Shared body of launch/stage1.sh and launch/stage2.sh (sourced, not run). It only turns the machine
# (Slurm allocation or a plain box) into one process per GPU (or per CPU rank) and a command line;
# each process derives its rank and master from srun's or the launcher's variables in
# pipeline/train/launch_env.py (the only place that does).
# Inputs from the sourcing script: STAGE_MODULE, DEFAULT_CONFIG. User overrides: see those scripts.
set -euo pipefail
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$REPO"
CONFIG=${CONFIG:-$DEFAULT_CONFIG}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
else  # CPU: DeepSpeed's CPU accelerator with gloo, CPU_RANKS processes per node
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  GPUS_PER_NODE=${GPUS_PER_NODE:-${CPU_RANKS:-2}}
  CORES=$(nproc)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES > GPUS_PER_NODE ? CORES / GPUS_PER_NODE : 1 ))}
fi
STAGE_ARGS=(--config "$CONFIG" "$@")
# --help and --print-config answer from one process (through the launcher every rank would print);
# --dry-run checks for this allocation's ranks unless --world-size says otherwise.
for arg in "$@"; do
  case "$arg" in
    --help|-h|--print-config) exec "$PYTHON" -m "$STAGE_MODULE" "${STAGE_ARGS[@]}" ;;
    --dry-run)
      [[ " $* " == *" --world-size "* ]] || STAGE_ARGS+=(--world-size $(( ${SLURM_JOB_NUM_NODES:-1} * GPUS_PER_NODE )))
      exec "$PYTHON" -m "$STAGE_MODULE" "${STAGE_ARGS[@]}" ;;
  esac
done

if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${SLURM_STEP_ID:-}" ]; then
  # Batch script under Slurm: one task per GPU on every node. Each task is a rank: SLURM_PROCID,
  # SLURM_LOCALID, SLURM_NTASKS; the master is the step's first host (MASTER_ADDR/MASTER_PORT win).
  NNODES=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | wc -l)
  echo "[launch] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x $GPUS_PER_NODE ranks"
  srun --nodes="$NNODES" --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1 \
    "$PYTHON" -u -m "$STAGE_MODULE" "${STAGE_ARGS[@]}" &
  child=$!
  # --signal=B:USR1@grace reaches this shell only: hand it to the ranks (srun forwards it to
  # every task), which checkpoint at the next step boundary, requeue the job and exit 0.
  trap 'echo "[launch] USR1/TERM: asking ranks to checkpoint"; kill -USR1 $child 2>/dev/null || true' USR1 TERM
  status=0
  while kill -0 "$child" 2>/dev/null; do wait "$child" || status=$?; done
  exit "$status"
else
  # One machine: DeepSpeed's launcher starts the ranks and sets their RANK, WORLD_SIZE, MASTER_*.
  MASTER_PORT=${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-$$} % 20000 ))}
  exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$GPUS_PER_NODE" --master_port "$MASTER_PORT" \
    --module "$STAGE_MODULE" "${STAGE_ARGS[@]}"
fi
