"""One GPU check: stage-1 and stage-2 training steps of a ~1B-parameter Llava under DeepSpeed ZeRO-3
on one GPU, with the flash path and bf16, through the pipeline's own code. No downloads.

    bash bench/gpu_check.sh                          # a CUDA machine (the wrapper: env, timeout)
    PYTHONPATH=. .venv/bin/python bench/gpu_check.py --device cpu --tiny   # the same logic, toy size

Random-weight Llama (Llama-3.2-1B's shape, vocabulary 32000) and CLIP vision tower (ViT-L/14-336's
shape) folders with a tokenizer trained on the batch's text (bench/gpu_check_world.py); `build_llava`
inside ZeRO-3, `apply_freeze`, `pipeline.train.engine.initialize` as configs/stage{1,2}.yaml say;
tiny-world samples through `SampleEncoder` and `collate` (padded, or packed as `loader.packing` lays
it out); each step `tga_forward` + engine backward + step. Per stage: with --attention both, the flash
path against SDPA on one batch (bench/gpu_check_attention.py); packed vs padded loss parts on the same
weights (TOLERANCE), then padded/packed × TGA/plain timed: s/step, tokens/s, model TFLOP/s, MFU, peak
memory. With --lora, configs/stage2_lora.yaml's model (adapters) initialises and takes 2 steps.
bench/README.md ("gpu_check") explains the output. Exit status 0 when every comparison holds, 1 when
one does not, 2 when this environment cannot run the check.

Pipeline modules are imported inside the functions: DeepSpeed reads DS_ACCELERATOR at its first
import, which `main` sets from --device.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gpu_check_attention import check_flash_equals_sdpa  # noqa: E402
from bench.gpu_check_lora import LORA_CONFIG, LORA_STEPS, run_lora  # noqa: E402
from bench.gpu_check_world import FULL, STAGES, TINY, Sizes, encode, micro_batch  # noqa: E402
from bench.gpu_check_world import stage_config, tiny_world_records, write_models  # noqa: E402

# |packed - padded| <= atol + rtol·|padded| for each loss part. bf16 keeps 8 significant bits
# (rounding 2^-9 ≈ 0.2% per operation); both layouts run the same attention kernel but GEMMs of
# other shapes, so they round differently: 1% leaves room for 16 layers of that and still catches
# a wrong mask or position id (those move the loss by whole units, not per mille).
TOLERANCE = {torch.bfloat16: (1e-2, 1e-2), torch.float32: (1e-4, 1e-5)}  # (rtol, atol)
# every pipeline module the check imports: what the wheelhouse route must provide (--imports-only)
CHECK_MODULES = ("pipeline.config", "pipeline.conventions", "pipeline.data.batch", "pipeline.data.shards", "pipeline.model.assemble",
                 "pipeline.model.lora", "pipeline.tga.prompt", "pipeline.tga.templates", "pipeline.tinyworld.models",
                 "pipeline.tinyworld.scenes", "pipeline.tinyworld.text", "pipeline.tinyworld.tokenizer",
                 "pipeline.train.config", "pipeline.train.distributed", "pipeline.train.engine",
                 "pipeline.train.flops", "pipeline.train.launch_env", "pipeline.train.memory",
                 "pipeline.train.metrics", "pipeline.train.step")


@dataclasses.dataclass
class Variant:
    name: str
    seconds: list[float]         # timed steps
    peak_gib: float | None       # CUDA only
    caption_forward_ran: bool    # the TGA text forward ran in its steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: the check (flash path, bf16, NCCL); cpu: SDPA, fp32, gloo")
    parser.add_argument("--tiny", action="store_true", help="toy model and micro-batches of 4 (the CPU test)")
    parser.add_argument("--attention", choices=("sdpa", "flash", "both"),
                        help="sdpa: the stages run SDPA; flash: the flash path that model.attn_implementation: auto "
                        "picks on CUDA (torch_varlen, or flash-attn's where it imports); both (default on cuda): flash, "
                        "and per stage one batch compared with SDPA (loss parts, projector gradient). On cpu (default "
                        "sdpa) flash does not exist (no CPU kernel) and both compares eager with SDPA")
    parser.add_argument("--lora", action="store_true", help=f"also {LORA_CONFIG}: the model with LoRA adapters "
                        f"initialises under ZeRO-3 and takes {LORA_STEPS} optimizer steps")
    parser.add_argument("--imports-only", action="store_true", help="import what the check needs, print the "
                        "versions and stop (needs no GPU: the wheelhouse route's last step before one is needed)")
    parser.add_argument("--steps", type=int, help="timed steps per variant (default 5, 2 with --tiny)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each variant's timed ones")
    parser.add_argument("--stage1-batch", type=int, help="stage-1 micro-batch (default: configs/stage1.yaml's)")
    parser.add_argument("--stage2-batch", type=int, help="stage-2 micro-batch (default: configs/stage2.yaml's)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of a GPU that pipeline/train/flops.py "
                        "does not know (for MFU)")
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else 2 if args.tiny else 5
    args.attention = args.attention or ("both" if args.device == "cuda" else "sdpa")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.device == "cpu" and args.attention == "flash":
        parser.error("--attention flash needs --device cuda: the flash kernels have no CPU version (on CPU, "
                     "--attention both compares eager with SDPA)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    started = time.perf_counter()
    if args.imports_only:
        return import_check_modules()
    dev, sizes = args.device, TINY if args.tiny else FULL
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if dev == "cuda" and not torch.cuda.is_available():
        listed = _nvidia_smi("-L").count("GPU ")
        seen = f"sees no GPU{f', although nvidia-smi lists {listed}' if listed else ''}"
        if torch.version.cuda:
            print(f"gpu_check: torch {torch.__version__} (a CUDA {torch.version.cuda} build) {seen}: check "
                  "CUDA_VISIBLE_DEVICES, and that nvidia-smi's driver supports that CUDA version.", file=sys.stderr)
        else:
            print(f"gpu_check: torch {torch.__version__} (a CPU build) {seen}: this is not the CUDA environment. "
                  "Build it on the GPU node (README, 'Installing on a CUDA cluster').", file=sys.stderr)
        return 2
    os.environ.setdefault("DS_ACCELERATOR", dev)
    # DeepSpeed JIT-builds its CPU comm op; a cache shared with another environment rebuilds it
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as transformers_logging

    from pipeline.train import engine as ds_engine
    from pipeline.train.distributed import shutdown
    from pipeline.train.launch_env import apply_rank_environment

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    # ZeRO-3 calls torch.distributed functions that torch deprecates, with a warning per call
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    print_versions(dev)
    plan = attention_plan(args.attention, dev, dtype)
    if plan is None:
        return 2
    ranks = apply_rank_environment()
    if ranks["WORLD_SIZE"] != "1":
        print(f"gpu_check runs one rank; this process is rank {ranks['RANK']} of {ranks['WORLD_SIZE']}: start one "
              "task (srun -n 1 --gres=gpu:1 bash bench/gpu_check.sh)", file=sys.stderr)
        return 2
    ds_engine.init_distributed(dev)
    results = {}
    with tempfile.TemporaryDirectory(prefix="tga-gpu-check-") as tmp:
        records = tiny_world_records(max(16, *(micro_batch(stage, args, sizes) for stage in STAGES)))
        phase = time.perf_counter()
        write_models(Path(tmp), sizes, records, dev, dtype)
        print(f"random-weight model folders written in {time.perf_counter() - phase:.0f} s")
        for stage in STAGES:
            results[stage] = run_stage(stage, args, sizes, records, Path(tmp), dtype, plan)
        if args.lora:
            results["lora"] = {"LoRA": run_lora(args, sizes, records, Path(tmp), plan[0])}
    shutdown()
    return summarise(results, plan, started)


def attention_plan(choice: str, dev: str, dtype: torch.dtype) -> tuple[str, str | None] | None:
    """(the attention the stages run, the one compared with SDPA or None); None when this machine
    has no flash path to run."""
    from pipeline.model.assemble import packs_one_row, resolve_attention

    if choice == "sdpa":
        return "sdpa", None
    if dev == "cpu":  # parse_args allows only `both` here
        print("attention: sdpa in the stages; eager stands in for the flash path in the comparison (the flash "
              "kernels have no CPU version)")
        return "sdpa", "eager"
    flash = resolve_attention("auto", dev, dtype)
    if not packs_one_row(flash):
        print(f"gpu_check: model.attn_implementation: auto resolves to {flash} here (torch {torch.__version__}, "
              f"flash-attn {_version('flash-attn')}): no flash path to check. --attention sdpa checks the rest.",
              file=sys.stderr)
        return None
    print(f"attention: {flash} (what model.attn_implementation: auto picks here)"
          f"{', compared with sdpa on one batch per stage' if choice == 'both' else ''}")
    return flash, flash if choice == "both" else None


def summarise(results: dict, plan: tuple[str, str | None], started: float) -> int:
    """The closing lines: one per kind of comparison, over the stages; 0 when every one holds."""
    print()
    checks = {"packed = padded": "packed = padded (every loss part, same weights) in stage 1 and stage 2"}
    if plan[1]:
        checks["flash = sdpa"] = f"{plan[1]} = sdpa (loss parts, projector gradient) in stage 1 and stage 2"
    if "lora" in results:
        checks["LoRA"] = f"LoRA ({LORA_CONFIG}): initialised under ZeRO-3, {LORA_STEPS} steps, finite losses"
    verdicts = {key: all(r[key] for r in results.values() if key in r) for key in checks}
    for key, text in checks.items():
        print(f"{text}: {'yes' if verdicts[key] else 'NO'}")
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    return 0 if all(verdicts.values()) else 1


def import_check_modules() -> int:
    """Import everything the check uses, print the versions: the environment is complete."""
    for name in CHECK_MODULES:
        importlib.import_module(name)
    print_versions(None)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"gpu_check: the check's {len(CHECK_MODULES)} pipeline modules import here; torch sees "
          f"{gpus or 'no'} GPU(s); the rest of the check needs one")
    return 0


def print_versions(dev: str | None) -> None:
    """The versions line; then the device (cuda, cpu), or nothing (None: --imports-only)."""
    import deepspeed
    import transformers

    print("== tga-pipeline GPU check (bench/gpu_check.py) ==")
    print(f"python {platform.python_version()} | torch {torch.__version__} | deepspeed {deepspeed.__version__} | "
          f"transformers {transformers.__version__} | flash-attn {_version('flash-attn')} | "
          f"torchvision {_version('torchvision')}")
    if dev == "cpu":
        print(f"device: CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s); SDPA, fp32, gloo")
    if dev != "cuda":
        return
    from pipeline.train.flops import peak_tflops_of

    gpu = torch.cuda.get_device_properties(0)
    driver = _nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader").splitlines()
    peak = peak_tflops_of(gpu.name)
    print(f"CUDA {torch.version.cuda} (torch's build), cuDNN {torch.backends.cudnn.version()}, driver "
          f"{driver[0] if driver else 'unknown'}; {torch.cuda.device_count()} GPU(s) visible, using GPU 0")
    print(f"GPU 0: {gpu.name}, {gpu.total_memory / 2**30:.1f} GiB, compute capability {gpu.major}.{gpu.minor}, "
          f"{gpu.multi_processor_count} SMs; dense bf16 peak "
          f"{f'{peak:.0f} TFLOP/s' if peak else 'unknown to pipeline/train/flops.py (give --peak-tflops)'}")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nvidia_smi(*args: str) -> str:
    try:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def run_stage(stage: str, args, sizes: Sizes, records: list[dict], tmp: Path, dtype: torch.dtype,
              plan: tuple[str, str | None]) -> dict[str, bool]:
    """Build the stage's engine, compare flash with SDPA (plan[1]), check packed = padded, time the
    variants, print; which comparisons held."""
    from pipeline.data.batch import collate
    from pipeline.model.assemble import apply_freeze, build_llava, packs_one_row
    from pipeline.train import engine as ds_engine
    from pipeline.train.flops import StepFlops, peak_flops_per_device
    from pipeline.train.metrics import batch_flops
    from pipeline.train.step import CaptionTargets

    phase, dev = time.perf_counter(), args.device
    cfg = stage_config(stage, args, sizes, tmp, attention=plan[0])
    ds = ds_engine.deepspeed_config(cfg, dev)
    zero3 = ds_engine.zero3_context(ds)  # noqa: F841 — alive while loading: from_pretrained into partitions
    assembled = build_llava(cfg.model, dev)
    tensors = apply_freeze(assembled.model, cfg.trainable)
    engine, _, _ = ds_engine.initialize(assembled.model, cfg, ds, 4 * (args.warmup + args.steps), dev)
    samples, pad = encode(assembled, cfg, records, stage), assembled.tokenizer.pad_token_id
    # one packed row for the flash path's varlen kernels, first-fit rows for SDPA (pipeline.train.job)
    single_row = packs_one_row(engine.module.config.text_config._attn_implementation)
    # packed: the varlen boundaries built by the collate; "captions in row": TGA's caption inputs as
    # segments of the packed row, so one forward gives the loss and the caption targets
    batches = {"padded": collate(samples, pad).to(engine.device),
               "packed": collate(samples, pad, packed=True, single_row=single_row).to(engine.device),
               "captions in row": collate(samples, pad, packed=True, single_row=single_row,
                                          captions_in_row=True).to(engine.device)}
    describe(stage, cfg, engine.module, len(tensors), batches, dtype, time.perf_counter() - phase)

    targets = CaptionTargets(cfg.tga.layers, cached=False)
    held = {}
    if plan[1]:
        row = {**batches, "flash row": collate(samples, pad, packed=True, single_row=True).to(engine.device)}
        held["flash = sdpa"] = check_flash_equals_sdpa(engine, row, targets, cfg.tga, plan[1], dtype)
    held["packed = padded"] = check_packed_equals_padded(engine, batches, targets, cfg.tga, dtype)
    plain = dataclasses.replace(cfg.tga, align_on=False, pair_on=False)
    runs = [(f"{layout}, {name}", batches[layout], tga) for layout in ("padded", "packed")
            for name, tga in (("TGA", cfg.tga), ("plain", plain))]
    runs.insert(3, ("captions in row, TGA", batches["captions in row"], cfg.tga))
    variants = [time_variant(name, engine, batch, targets, tga, args) for name, batch, tga in runs]
    padded, flops = batches["padded"], StepFlops.of(engine.module, caption_layers=targets.depth)
    # the same model FLOPs the training loop logs (pipeline.train.metrics.batch_flops)
    step_flops = {v.name: batch_flops(flops, batch, v.caption_forward_ran) for v, (_, batch, _) in zip(variants, runs)}
    print_table(variants, int(padded.seq_lens.sum()), step_flops,
                peak_flops_per_device(engine.device, args.peak_tflops), args.warmup)
    print_memory_plan(cfg, padded, engine.module.config.image_seq_length, variants)
    engine.destroy()
    del engine, assembled, zero3, batches, padded
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return held


def print_memory_plan(cfg, batch, image_tokens: int, variants: list) -> None:
    """pipeline/train/memory.py's estimate for this config and this batch's mean sample length, beside
    the measured peak (torch's allocator peak has no CUDA context: compare without the reserve)."""
    from pipeline.train.memory import RESERVE, plan

    images = 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
    text = float(batch.seq_lens.float().mean()) - images / len(batch) * image_tokens
    estimate = plan(cfg, world_size=1, text_tokens=max(1, round(text)))
    measured = max((v.peak_gib for v in variants if v.peak_gib is not None), default=None)
    print(f"memory plan (pipeline/train/memory.py): {(estimate.totals[0] - RESERVE) / 2**30:.2f} GiB without its "
          f"{RESERVE / 2**30:.0f} GiB reserve; measured peak "
          f"{f'{measured:.2f} GiB' if measured is not None else 'n/a (CPU)'}")


def describe(stage: str, cfg, model, tensors: int, batches: dict, dtype: torch.dtype, build_seconds: float) -> None:
    numel = {p: getattr(p, "ds_numel", p.numel()) for p in model.parameters()}  # ZeRO-3: the whole tensor
    trains = sum(n for p, n in numel.items() if p.requires_grad)
    text, vision = model.config.text_config, model.config.vision_config
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    print(f"\n== {stage.replace('stage', 'stage ')}: configs/{stage}.yaml; trains {' + '.join(cfg.trainable)}: "
          f"{trains / 1e6:.4g} M of {sum(numel.values()) / 1e6:.4g} M parameters ({tensors} tensors); "
          f"engine built in {build_seconds:.0f} s")
    print(f"model: Llama hidden {text.hidden_size} x {text.num_hidden_layers} layers, heads {text.num_attention_heads}/"
          f"{text.num_key_value_heads}, MLP {text.intermediate_size}, vocabulary {text.vocab_size}; CLIP vision "
          f"{vision.hidden_size} x {vision.num_hidden_layers} layers, {vision.image_size} px / {vision.patch_size} -> "
          f"{image_tokens} image tokens; random weights; {text._attn_implementation}, {_name(dtype)}, ZeRO-3, "
          f"1 rank; gradient checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}; TGA layers "
          f"{cfg.tga.layers}, caption targets every step (a one-epoch run): from a text forward, or from the "
          f"caption segments of the packed row")
    padded, packed = batches["padded"], batches["packed"]
    tokens, positions = int(padded.seq_lens.sum()), padded.input_ids.numel()
    images = 0 if padded.pixel_values is None else padded.pixel_values.shape[0]
    print(f"micro-batch: {len(padded)} samples ({images} with an image), {tokens} real tokens, longest "
          f"{int(padded.seq_lens.max())}; padded {tuple(padded.input_ids.shape)} = {positions} positions "
          f"({1 - tokens / positions:.0%} padding), packed {tuple(packed.input_ids.shape)}; caption input "
          f"{tuple(padded.caption_input_ids.shape)}")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_packed_equals_padded(engine, batches: dict, targets, tga_cfg, dtype: torch.dtype) -> bool:
    """Every loss part of a no-grad forward of each layout on the same weights, within TOLERANCE of
    the padded batch's."""
    from pipeline.train.step import tga_forward

    rtol, atol = TOLERANCE[dtype]
    values = {}
    with torch.no_grad():
        for layout, batch in batches.items():
            loss, parts = tga_forward(engine, batch, targets, 0.0, tga_cfg)
            values[layout] = {"loss": float(loss), **{k: float(parts[k]) for k in ("lm", "align", "pair")}}
    print(f"packed vs padded, no-grad forward on the same weights; tolerance |packed - padded| <= {atol:g} + "
          f"{rtol:g} x |padded| ({_name(dtype)}):")
    ok = True
    for layout in (name for name in values if name != "padded"):
        for part, padded in values["padded"].items():
            packed = values[layout][part]
            within = abs(packed - padded) <= atol + rtol * abs(padded)
            ok &= within
            print(f"  {part:6s} padded {padded:11.6f}  {layout} {packed:11.6f}  |diff| {abs(packed - padded):.1e}  "
                  f"{'ok' if within else 'OUT OF TOLERANCE'}")
    print(f"  packed = padded: {'yes' if ok else 'NO'}")
    return ok


def time_variant(name: str, engine, batch, targets, tga_cfg, args) -> Variant:
    """--warmup untimed, then --steps timed training steps (synchronised on CUDA)."""
    from pipeline.train.step import tga_forward

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds, forwards = [], targets.forwards
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        loss, _ = tga_forward(engine, batch, targets, 0.0, tga_cfg)
        engine.backward(loss)
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            seconds.append(time.perf_counter() - started)
    return Variant(name, seconds, torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                   caption_forward_ran=targets.forwards > forwards)


def print_table(variants: list[Variant], tokens: int, step_flops: dict, peak_flops: float | None, warmup: int) -> None:
    median = {v.name: statistics.median(v.seconds) for v in variants}
    width = max(len(v.name) for v in variants)
    print(f"{'variant':{width}s} {'s/step':>8s} {'tokens/s':>10s} {'TFLOP/s':>9s} {'MFU':>6s} {'peak GiB':>9s}")
    for v in variants:
        flops_per_second = step_flops[v.name] / median[v.name]
        mfu = f"{flops_per_second / peak_flops:.1%}" if peak_flops else "n/a"
        memory = f"{v.peak_gib:.2f}" if v.peak_gib is not None else "n/a"
        print(f"{v.name:{width}s} {median[v.name]:8.4f} {tokens / median[v.name]:10.1f} {flops_per_second / 1e12:9.4g} "
              f"{mfu:>6s} {memory:>9s}")
    print(f"(median of {len(variants[0].seconds)} timed step(s) after {warmup} untimed; tokens/s: real tokens, not "
          "padding; TFLOP/s: pipeline/train/flops.py's model FLOPs, without padding or recomputation; MFU: that over "
          "the GPU's dense bf16 peak; peak GiB: torch.cuda.max_memory_allocated over the variant's steps)")
    packed_over_padded = {name: median[f"padded, {name}"] / median[f"packed, {name}"] for name in ("TGA", "plain")}
    tga_over_plain = {layout: median[f"{layout}, TGA"] / median[f"{layout}, plain"] for layout in ("padded", "packed")}
    in_row = median["captions in row, TGA"] / median["packed, plain"]
    print(f"tokens/s packed/padded: TGA {packed_over_padded['TGA']:.3f}, plain {packed_over_padded['plain']:.3f}; "
          f"step time TGA/plain: padded {tga_over_plain['padded']:.3f}, packed {tga_over_plain['packed']:.3f}, "
          f"packed with the captions in the row {in_row:.3f}")

if __name__ == "__main__":
    sys.exit(main())
