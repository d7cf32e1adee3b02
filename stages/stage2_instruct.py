"""Stage 2: instruction tuning (projector + LLM) with retrieved text in the prompt and TGA.

    python -m stages.stage2_instruct --config configs/tiny/stage2.yaml [key.sub=value ...]
    deepspeed stages/stage2_instruct.py --config configs/stage2.yaml
    bash|sbatch launch/stage2.sh
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the DeepSpeed launcher: make `pipeline` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.process_exit import run_as_process  # noqa: E402
from pipeline.train.cli import run_training_stage  # noqa: E402

if __name__ == "__main__":
    run_as_process(lambda: run_training_stage("stage2"))
