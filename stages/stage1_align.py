"""Stage 1: projector alignment with the TGA loss (vision tower and LLM frozen).

    python -m stages.stage1_align --config configs/tiny/stage1.yaml [key.sub=value ...]
    deepspeed stages/stage1_align.py --config configs/stage1.yaml
    bash|sbatch launch/stage1.sh
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the DeepSpeed launcher: make `pipeline` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.process_exit import run_as_process  # noqa: E402
from pipeline.train.cli import run_training_stage  # noqa: E402

if __name__ == "__main__":
    run_as_process(lambda: run_training_stage("stage1"))
