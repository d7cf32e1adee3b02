"""pipeline.train.metrics: the step meter's combination over ranks and the printed progress line."""
from __future__ import annotations

from pipeline.train.metrics import step_line


def test_step_line_shows_progress_losses_throughput_eta_and_memory():
    metrics = {"lm": 7.79, "align": 0.69, "pair": 1.7, "lr": 9.9e-4, "samples_per_second": 35.2,
               "tokens_per_second": 1480.4, "data_wait_fraction": 0.031, "peak_memory_gb": 1.23}
    line = step_line("stage1", 20, 48, metrics, elapsed_seconds=60.0, steps_done=20)
    assert line == ("[stage1] step 20/48 lm 7.7900 align 0.6900 pair 1.7000 lr 0.00099 | 35.2 samples/s "
                    "1480 tokens/s data 3% | ETA 1m24s | peak 1.2 GB")


def test_step_line_eta_counts_only_the_steps_this_process_ran_and_shows_hours():
    # resumed at step 1000: 10 steps in 36 s, 9000 to go → 9 h
    line = step_line("stage2", 1010, 10010, {"lm": 1.0}, elapsed_seconds=36.0, steps_done=10)
    assert "ETA 9h00m" in line and "align" not in line


def test_progress_in_a_log_file_is_whole_lines_without_carriage_returns():
    import io

    from pipeline.progress import LOG_INTERVAL_S, progress

    log = io.StringIO()  # not a terminal, like a Slurm .out file
    with progress(500, desc="pack", stream=log) as bar:
        for _ in range(500):
            bar.update(1)
    assert bar.mininterval == LOG_INTERVAL_S
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0].startswith("pack:") and "500/500" in lines[-1]
