"""The benchmarks keep working: each runs in its --quick mode as a real process and prints its figures.

Both start at once (a module fixture) so the file costs about the slower one, not the sum. Timing
values are not judged here (a loaded CI box makes them noise); what is checked is that every
figure is printed, parses, and that the correctness checks inside the benchmarks held: the cached
caption targets ran one text forward only (else bench_tga_overhead exits non-zero), and a checkpoint
saved without frozen parameters restored the projector and the step counter.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BENCHES = {name: (name, []) for name in ("bench_tga_overhead", "bench_checkpoint", "bench_stage2_throughput",
                                          "bench_lora")}
# 576 image tokens at the smallest sizes (~8 CPU seconds): the option's tower, prompt and LLM are built and run
BENCHES["bench_tga_overhead_llava"] = ("bench_tga_overhead", [
    "--llava-shape", "--hidden", "64", "--layers", "4", "--batch", "1", "--tower-hidden", "32", "--tower-layers", "1"])
TIMEOUT_SECONDS = 240  # the file stays well under a minute on an idle 2-core machine; this is for a loaded one
NUMBER = r"(\d+(?:\.\d+)?)"


@pytest.fixture(scope="module")
def quick_runs(tiny_world, tmp_path_factory):
    """name -> (Popen, log path) of each benchmark's --quick run, all started before any is awaited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    logs = tmp_path_factory.mktemp("bench")
    runs = {}
    for name, (script, options) in BENCHES.items():
        log = logs / f"{name}.log"
        with open(log, "wb") as out:
            runs[name] = (subprocess.Popen(
                [sys.executable, str(REPO / "bench" / f"{script}.py"), "--quick", "--world", str(tiny_world.root),
                 *options],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True), log)
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the benchmark and its stage run
            proc.wait()


def output_of(runs, name: str) -> str:
    proc, log = runs[name]
    try:
        proc.wait(timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} --quick ran over {TIMEOUT_SECONDS} s:\n{log.read_text(errors='replace')[-3000:]}")
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"{name} --quick exited {proc.returncode}:\n{text[-3000:]}"
    return text


def figure(text: str, pattern: str) -> tuple[float, ...]:
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no line matching {pattern!r} in:\n{text[-3000:]}"
    return tuple(float(g) for g in match.groups())


@pytest.mark.parametrize("run", ["bench_tga_overhead", "bench_tga_overhead_llava"], ids=["tiny", "llava-shape"])
def test_tga_overhead_quick_prints_all_four_variants_and_their_ratios_to_plain(quick_runs, run):
    text = output_of(quick_runs, run)
    (plain,) = figure(text, rf"^\(a\) plain LLaVA stage 1 \(LM loss only\)\s+{NUMBER}\s+1\.00x$")
    assert plain > 0
    for label in (r"\(b\) TGA, cached caption targets", r"\(c\) TGA, uncached \(text forward each step\)",
                  r"\(d\) reference: eager \+ attentions, 2nd forward"):
        seconds, ratio = figure(text, rf"^{label}\s+{NUMBER}\s+{NUMBER}x$")
        assert seconds > 0 and ratio == pytest.approx(seconds / plain, abs=0.01)
    for variant in "bcd":
        (ratio,) = figure(text, rf"^ratio \({variant}\)/\(a\) = {NUMBER}$")
        assert ratio > 0
    in_row, _ = figure(text, rf"^\(e\) TGA, captions in the packed rows\s+{NUMBER}\s+{NUMBER}x$")
    packed, _ = figure(text, rf"^\(f\) plain, packed rows\s+{NUMBER}\s+{NUMBER}x$")
    (ratio,) = figure(text, rf"^ratio \(e\)/\(f\) = {NUMBER} \(packed rows \(\d+, \d+\), with the captions")
    assert ratio == pytest.approx(in_row / packed, abs=0.01)
    text_forward, share_of_plain, _ = figure(
        text, rf"^uncached text forward alone: {NUMBER} s = {NUMBER}% of \(a\), {NUMBER}% of \(c\)$")
    assert text_forward > 0 and share_of_plain > 0
    (attention_mb,) = figure(text, rf"^attention maps materialised per step by \(d\): {NUMBER} MB$")
    assert attention_mb > 0
    for variant in "bc":
        assert re.search(rf"^goal \({variant}\)/\(a\) <= 1\.10: (met|NOT met)$", text, re.MULTILINE)
    tokens, caption, caption_input, labelled = figure(
        text, rf"^per sample: {NUMBER} tokens; caption {NUMBER} tokens \(\d+-\d+\), caption forward input "
              rf"{NUMBER} tokens; labelled {NUMBER}% of the tokens$")
    assert 0 < caption <= caption_input < tokens and 0 < labelled < 100
    image_size, patch, tower_seconds, tower_share = figure(
        text, rf"^vision tower: {NUMBER} px, patch {NUMBER}, hidden \d+, \d+ layers; its forward alone: "
              rf"{NUMBER} s = {NUMBER}% of \(a\)$")
    (image_tokens,) = figure(text, rf"^batch: \d+ samples, \d+ tokens \({NUMBER} image tokens\)")
    assert (image_size // patch) ** 2 == image_tokens and tower_seconds > 0 and tower_share > 0
    if run == "bench_tga_overhead_llava":  # CLIP-L/14-336's token count, LCS-558K-length captions
        assert (image_size, patch, image_tokens) == (336, 14, 576) and 10 <= caption <= 30


def test_checkpoint_quick_saves_loads_resumes_and_prints_its_costs(quick_runs):
    text = output_of(quick_runs, "bench_checkpoint")
    save, load = figure(text, rf"^checkpoint save: {NUMBER} s\s+load \(resume, in process\): {NUMBER} s$")
    assert save > 0 and load > 0
    (size,) = figure(text, rf"^checkpoint size on disk: {NUMBER} MB")
    assert size > 0
    for config in ("configs/stage1.yaml", "configs/tiny/stage1.yaml"):
        every = yaml.safe_load((REPO / config).read_text())["checkpoint"]["every_steps"]
        (share,) = figure(text, rf"^save share of run at every_steps={every} \({re.escape(config)}\): {NUMBER}%$")
        assert 0 < share < 100
    slim, full = figure(text, rf"^exclude_frozen_parameters=True: {NUMBER} MB vs {NUMBER} MB with frozen params")
    assert slim < full
    assert re.search(r"projector and step restored: yes$", text, re.MULTILINE), text[-3000:]
    (resume,) = figure(text, rf"^resume-to-first-step: {NUMBER} s")
    assert resume > 0


def test_stage2_throughput_quick_prints_tokens_per_second_of_padded_and_packed_and_the_text_forward(quick_runs):
    text = output_of(quick_runs, "bench_stage2_throughput")
    speeds = {}
    for key, label in (("a", r"\(a\) padded, TGA"), ("b", r"\(b\) packed rows, TGA"),
                       ("b1", r"\(b1\) packed, one row, TGA"), ("b2", r"\(b2\) packed rows, captions in the rows, TGA"),
                       ("c", r"\(c\) padded, LM loss only")):
        seconds, tokens_per_second = figure(text, rf"^{label}\s+{NUMBER}\s+{NUMBER}$")
        assert seconds > 0 and tokens_per_second > 0
        speeds[key] = tokens_per_second
    (ratio,) = figure(text, rf"^ratio tokens/s packed/padded \(b\)/\(a\) = {NUMBER}$")
    assert ratio == pytest.approx(speeds["b"] / speeds["a"], rel=0.02)
    (share,) = figure(text, rf"^TGA text forward alone: {NUMBER} s = {NUMBER}% of \(a\)$")[1:] or (0,)
    assert share > 0
    padded, packed = figure(text, rf"padded \(16, \d+\) = {NUMBER} positions .* packed \(\d+, \d+\) = {NUMBER} positions")
    assert packed < padded, "packing removes padding"


def test_lora_quick_prints_step_time_optimizer_state_and_checkpoint_size_of_lora_and_full(quick_runs):
    text = output_of(quick_runs, "bench_lora")
    rows = {}
    for name in ("full", "lora"):
        seconds, optimizer_mb, checkpoint_mb = figure(  # the trainable count (with commas) is skipped
            text, rf"^{name}\s+{NUMBER}\s+[\d,]+\s+{NUMBER}\s+{NUMBER}$")
        rows[name] = (seconds, optimizer_mb, checkpoint_mb)
        assert seconds > 0
    # what LoRA is for: far less optimizer state and a smaller checkpoint than full training
    assert rows["lora"][1] < rows["full"][1] and rows["lora"][2] < rows["full"][2]
    (ratio,) = figure(text, rf"^ratio optimizer state lora/full = {NUMBER}$")
    assert ratio == pytest.approx(rows["lora"][1] / rows["full"][1], rel=0.05)
