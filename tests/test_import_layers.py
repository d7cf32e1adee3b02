"""The training core's shape, read by bench/import_layers.py (a static walk: nothing is imported): no
import runs upward between pipeline's subpackages, the training loop never reaches the preflight,
and no function in pipeline/ is over 60 lines."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

from tests.stage_runner import REPO

spec = importlib.util.spec_from_file_location("import_layers", REPO / "bench" / "import_layers.py")
import_layers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_layers)


def test_no_import_runs_upward_and_the_training_loop_never_reaches_the_preflight():
    top, _ = import_layers.import_graph(import_layers.read_tree(REPO / "pipeline"))
    assert import_layers.package_cycles(top) == []
    assert import_layers.reaches(top, import_layers.LOOP, import_layers.PREFLIGHT) == []
    assert "pipeline.train.plan" in top["pipeline.train.job"]  # the walk sees the builder's imports


def test_no_function_in_pipeline_is_over_60_lines():
    trees = import_layers.read_tree(REPO / "pipeline")
    long = [(module, name, lines) for module, name, lines in import_layers.functions(trees)
            if lines > import_layers.MAX_FUNCTION_LINES]
    assert long == []


def test_the_script_prints_the_layers_and_the_loader_state_fields():
    out = subprocess.run([sys.executable, "bench/import_layers.py"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert "import layers of pipeline/train/" in out and "  layer 0: " in out
    assert "pipeline.data.loader.ShardBatches: " in out and "train() in pipeline.train.loop: " in out
