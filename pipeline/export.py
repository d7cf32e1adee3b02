"""Export a ZeRO-3 checkpoint: the stage-1 projector file, or a transformers Llava folder.

    python -m pipeline.export --checkpoint RUN_DIR/checkpoints [--step N] --out OUT \\
        [--format projector|hf|lora] [--dtype bf16|fp16|fp32] [--config RUN_DIR/config.yaml] [key.sub=value ...]

Every format starts from DeepSpeed's zero_to_fp32 consolidation of one complete checkpoint (default:
the one `latest` names), so an export never needs the ranks, GPUs or DeepSpeed engine that trained.
It reads only what trained, lazily (one tensor at a time, converted to the output dtype as it is
copied in): host memory stays near one copy of the model in that dtype (fp16: in fp32, its build
dtype). Frozen weights (the vision tower; in stage 1 the LLM) come from the model folders the
run's config names, as on a resume.

- `projector`: OUT/projector.safetensors, the same file the stage-1 loop writes at its end
  (`model.projector` of the next stage, or `load_projector`).
- `hf`: a folder that `AutoModelForImageTextToText.from_pretrained(OUT)` and
  `AutoProcessor.from_pretrained(OUT)` load with plain transformers: `LlavaForConditionalGeneration`
  safetensors + config, the tokenizer with the training chat template, and a `LlavaProcessor`
  whose image preprocessing and `<image>` expansion are the ones training used. The model paths
  and the template come from the run's resolved config (`RUN_DIR/config.yaml`, written by the loop).
  A LoRA run's adapters are merged in (no peft needed to load it). Weights in the dtype the run
  trained in by default (bf16 on GPUs, fp32 on CPU; `--dtype`), a README.md model card (pipeline/model_card.py) and `tga_training.json` beside them.
- `lora` (LoRA runs): OUT is the adapter in peft's format (adapter_config.json,
  adapter_model.safetensors) and OUT/base the `hf` folder of the un-adapted model it applies to.

OUT is written under a temporary sibling name and renamed when complete: a crashed export leaves no
folder that looks finished.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image
from transformers import LlavaProcessor
from transformers.models.llava import LlavaImageProcessor

from pipeline.config import ConfigError, load_config
from pipeline.conventions import IMAGE_TOKEN
from pipeline.model.assemble import AssembledModel, apply_freeze, build_llava, projector_state_dict, save_projector
from pipeline.model.lora import add_lora
from pipeline.model_card import training_data, write_card
from pipeline.process_exit import run_as_process
from pipeline.tga.templates import get_template, template_source
from pipeline.train.checkpoint import (CheckpointError, latest_complete_step, read_marker, saved_steps,
                                       step_tag, trained_weights)
from pipeline.train.config import TrainConfig
from pipeline.train.run_folder import RunFolder

_PROJECTOR = RunFolder(".").projector.name  # same file name as the stage-1 loop writes
log = logging.getLogger("pipeline.export")

TRAINING_INFO = "tga_training.json"  # in an hf export: prompt, TGA layers and MLflow run of the training
# The skeleton holds the frozen weights from their folders and receives the trained ones: built on
# CPU without the stage-1 projector file a stage-2 config points at (the checkpoint holds the
# trained one), in the output dtype where the model config has it (fp16: built in fp32, cast last).
_SKELETON_OVERRIDES = ["model.projector=null", "model.attn_implementation=sdpa",
                       "model.gradient_checkpointing=false"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_DTYPE = "bf16"  # when the run does not say: what LLaVA-class models compute in on GPUs
_SKELETON_DTYPE = {"bf16": "bf16", "fp16": "fp32", "fp32": "fp32"}
_MAX_LISTED_KEYS = 20


class ExportError(RuntimeError):
    """An export that cannot be written: the message names the file and the fix."""


def resolve_step(ckpt_dir: str | Path, step: int | None) -> int:
    """`step` if it is a complete checkpoint of `ckpt_dir`; None means the newest complete one."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise ExportError(f"{ckpt_dir}: no such checkpoint folder (expected RUN_DIR/checkpoints)")
    complete = saved_steps(ckpt_dir)
    if step is None:
        step = latest_complete_step(ckpt_dir)
        if step is None:
            hint = (f"; did you mean {ckpt_dir / 'checkpoints'}?" if (ckpt_dir / "checkpoints").is_dir()
                    else "")
            raise ExportError(f"{ckpt_dir}: no complete checkpoint (global_step<N>/ with a COMPLETE "
                              f"marker){hint}")
        return step
    if not (ckpt_dir / step_tag(step)).is_dir():
        raise ExportError(f"{ckpt_dir}: no checkpoint for step {step}; complete steps: {complete or 'none'}")
    # A folder without COMPLETE: the checkpoint module refuses it with its own message.
    return step


def consolidate(ckpt_dir: str | Path, step: int | None) -> tuple[int, dict]:
    """(step, the trained weights of a complete checkpoint): name → lazy fp32 tensor (`.contiguous()`)."""
    step = resolve_step(ckpt_dir, step)
    log.info("consolidating %s", Path(ckpt_dir) / step_tag(step))
    return step, trained_weights(ckpt_dir, step)


def export_projector(ckpt_dir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """OUT/projector.safetensors from checkpoint `step` (default: latest complete)."""
    _refuse_existing(Path(out))
    step, state = consolidate(ckpt_dir, step)
    with _staged(Path(out)) as staging:  # the fp32 masters: stage 2 casts them to its own dtype
        save_projector(projector_state_dict(state), staging / _PROJECTOR)
    return Path(out) / _PROJECTOR


def run_config(ckpt_dir: str | Path, config: str | Path | None = None,
               overrides: list[str] = (), dtype: str = "fp32") -> TrainConfig:
    """The resolved training config of the run that wrote `ckpt_dir` (default: its config.yaml), with
    the model built for an export in `dtype`."""
    path = Path(config) if config is not None else RunFolder.of_checkpoints(ckpt_dir).config
    if not path.is_file():
        raise ExportError(f"{path}: no run config (the training loop writes {path.name} next to "
                          "checkpoints/); pass --config with the run's resolved config")
    try:
        return load_config(TrainConfig, path, [*_SKELETON_OVERRIDES, f"model.dtype={_SKELETON_DTYPE[dtype]}",
                                               *overrides])
    except ConfigError as err:
        raise ExportError(f"{err}\nThe export needs the run's model folders (model.*); fix a moved or "
                          "deleted path with a key=value override on the command line "
                          "(e.g. model.llm=<the LLM folder>)") from None


def training_dtype(ckpt_dir: str | Path) -> str:
    """The dtype the run computed in, from the DeepSpeed config it trained with (bf16 on GPUs by
    default, fp32 on CPU); DEFAULT_DTYPE when that file is gone."""
    path = RunFolder.of_checkpoints(ckpt_dir).deepspeed_config
    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return DEFAULT_DTYPE
    for name in ("bf16", "fp16"):
        if (ds.get(name) or {}).get("enabled") is True:
            return name
    return "fp32"


def export_hf(ckpt_dir: str | Path, out: str | Path, step: int | None = None,
              config: str | Path | None = None, overrides: list[str] = (), adapter: bool = False,
              dtype: str | None = None) -> Path:
    """A transformers Llava folder (model in `dtype`, tokenizer, chat template, processor, model card)
    from checkpoint `step`.

    A LoRA run's adapters are merged into the LLM's linears: the folder needs no peft. With
    `adapter` (a LoRA run only) OUT instead holds the adapter in peft's format and OUT/base the
    Llava it applies to: `PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(
    OUT/base), OUT)`.
    """
    dtype = dtype or training_dtype(ckpt_dir)
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    _refuse_existing(Path(out))
    step = resolve_step(ckpt_dir, step)
    cfg = run_config(ckpt_dir, config, overrides, dtype=dtype)
    if adapter and cfg.lora is None:
        raise ExportError(f"{ckpt_dir}: --format lora needs a run with a lora section; this one trained "
                          f"{cfg.trainable} fully (use --format hf)")
    # Model folders and processor first: their errors come in seconds, the consolidation takes minutes.
    # The folders give the frozen weights: checkpoints hold only what trained (Checkpointer).
    assembled = build_llava(cfg.model, "cpu")
    peft_model = add_lora(assembled.model, cfg.lora) if cfg.lora is not None else None
    trained = apply_freeze(assembled.model, cfg.trainable, lora=peft_model is not None)
    processor = build_processor(assembled, cfg)
    step, state = consolidate(ckpt_dir, step)
    load_full_state(assembled.model, state, Path(ckpt_dir) / step_tag(step), required=set(trained))
    del state  # releases DeepSpeed's memory maps of the checkpoint
    info = training_info(cfg, Path(ckpt_dir), step, dtype=dtype)
    with _staged(Path(out)) as staging:
        if adapter:
            peft_model.peft_config["default"].base_model_name_or_path = str(Path(out).resolve() / "base")
            peft_model.to(DTYPES[dtype]).save_pretrained(staging)
            _save_model_folder(peft_model.unload(), processor, {**info, "lora_merged": False}, staging / "base",
                               dtype, Path(out).name)
        else:
            model = peft_model.merge_and_unload() if peft_model is not None else assembled.model
            _save_model_folder(model, processor, info, staging, dtype, Path(out).name)
    return Path(out)


def _save_model_folder(model: torch.nn.Module, processor, info: dict, folder: Path, dtype: str,
                       name: str) -> None:
    _cast(model, DTYPES[dtype]).save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / TRAINING_INFO).write_text(json.dumps(info, indent=2) + "\n")
    write_card(folder, title=name)


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The weights (a no-op but for fp16, built in fp32) and every sub-config in `dtype`:
    save_pretrained records the dtype of the top-level config only."""
    model.to(dtype)
    for key in model.config.sub_configs:
        getattr(model.config, key).dtype = dtype
    return model


def training_info(cfg: TrainConfig, ckpt_dir: Path, step: int, dtype: str | None = None) -> dict:
    """What the evaluation tools need to know about how the exported model was trained: the prompt
    (so DSR inserts the retrieved text exactly as training did), the TGA layers, and the MLflow run
    (so their reports land next to the training curves); and what the model card says about it
    (base models, data, TGA settings, steps), so the card can be rewritten from the folder alone.
    Folders from elsewhere simply lack it."""
    run = RunFolder.of_checkpoints(ckpt_dir)
    tracking = run.read_tracking() or {}
    step_dir = Path(ckpt_dir) / step_tag(step)
    world = int(read_marker(step_dir)["world_size"]) if step_dir.is_dir() else None
    per_rank = cfg.loader.batch_size * cfg.optim.grad_accum
    return {
        "stage": cfg.stage,
        "step": step,
        "run_dir": str(run.path.resolve()),
        "tracking_uri": tracking.get("tracking_uri"),
        "run_id": tracking.get("run_id"),
        "experiment": cfg.tracking.experiment,
        "prompt": dataclasses.asdict(cfg.prompt),
        "tga_layers": list(cfg.tga.layers),
        "tga": dataclasses.asdict(cfg.tga),
        "trainable": list(cfg.trainable),
        "lora": dataclasses.asdict(cfg.lora) if cfg.lora is not None else None,
        "lora_merged": cfg.lora is not None,  # False in --format lora's OUT/base: the adapter is OUT
        "dtype": dtype,
        "base_models": {"llm": str(cfg.model.llm), "vision_tower": str(cfg.model.vision_tower)},
        "data": training_data(cfg.datasets),
        "world_size": world,
        "samples_seen": step * world * per_rank if world else None,
    }


def load_full_state(model: torch.nn.Module, state: dict, source: Path, required: set[str] | None = None) -> None:
    """Copy consolidated weights into `model`, one tensor at a time and cast to the model's dtype;
    every name and shape must match. `state` values are tensors or DeepSpeed's lazy ones (`.shape`,
    `.contiguous()`). `required`: the names the state must hold when it holds only part of the
    model (the trained weights; the rest stays as the model folders gave it)."""
    expected = model.state_dict()
    missing = sorted((set(expected) if required is None else required) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ExportError(
            f"{source}: the checkpoint's weights do not match the model built from the run config "
            f"(other LLM / vision tower / tokenizer than in training?)\n"
            f"  missing from the checkpoint ({len(missing)}): {_listed(missing)}\n"
            f"  not in the model ({len(unexpected)}): {_listed(unexpected)}")
    wrong = [f"{k}: checkpoint {tuple(w.shape)}, model {tuple(expected[k].shape)}"
             for k, w in state.items() if tuple(w.shape) != tuple(expected[k].shape)]
    if wrong:
        raise ExportError(f"{source}: {len(wrong)} weight(s) differ in shape from the model built from "
                          f"the run config: {_listed(wrong)}")
    with torch.no_grad():
        for name, weight in state.items():
            expected[name].copy_(weight.contiguous())  # state_dict() tensors share the parameters' storage


def export_chat_template(cfg: TrainConfig, tokenizer) -> str:
    """The training template, readable also from transformers' multimodal message format.

    Training renders string contents; `processor.apply_chat_template` users pass
    `[{"type": "image"}, {"type": "text", "text": ...}]`. The prefix joins such a list into the
    string training saw (`<image>\\nquestion`), so both render byte-identically.
    """
    source = template_source(get_template(cfg.prompt.template), tokenizer)
    image = IMAGE_TOKEN.replace("\\", "\\\\").replace("'", "\\'")
    to_text = (
        "{%- set converted = namespace(messages=[]) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}"
        "{%- set converted.messages = converted.messages + [message] -%}"
        "{%- else -%}"
        "{%- set parts = namespace(texts=[]) -%}"
        "{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{%- set parts.texts = parts.texts + ['" + image + "'] -%}"
        "{%- elif item['type'] == 'text' -%}{%- set parts.texts = parts.texts + [item['text']] -%}"
        "{%- else -%}{{- raise_exception('only text and image content is supported') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set converted.messages = converted.messages"
        " + [{'role': message['role'], 'content': parts.texts | join('\\n')}] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = converted.messages -%}"
    )
    return to_text + source


def build_processor(assembled: AssembledModel, cfg: TrainConfig) -> LlavaProcessor:
    """A LlavaProcessor that preprocesses images and expands `<image>` exactly as training did."""
    config = assembled.model.config
    # LlavaImageProcessor = the tower's CLIP preprocessing + LLaVA-1.5's pad-to-square with the
    # mean colour (do_pad), which is what pipeline.data.batch applies before the CLIP processor.
    settings = {k: v for k, v in assembled.image_processor.to_dict().items() if k != "image_processor_type"}
    image_processor = LlavaImageProcessor(**settings, do_pad=cfg.model.pad_to_square)
    tokenizer = assembled.tokenizer
    template = export_chat_template(cfg, tokenizer)
    tokenizer.chat_template = template
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        # CLIP adds a CLS embedding to the patches; "default" drops it again, so the processor
        # counts (size / patch)² + 1 - 1 placeholders = config.image_seq_length.
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN, chat_template=template)
    _check_image_expansion(processor, config)
    return processor


def _check_image_expansion(processor: LlavaProcessor, config) -> None:
    crop = processor.image_processor.crop_size
    blank = Image.new("RGB", (crop["width"], crop["height"]))
    ids = processor(images=blank, text=processor.image_token, return_tensors="pt")["input_ids"][0]
    found = int((ids == config.image_token_index).sum())
    if found != config.image_seq_length:
        raise ExportError(f"the processor expands {processor.image_token} to {found} tokens but the model "
                          f"expects image_seq_length={config.image_seq_length} (vision tower "
                          f"{config.vision_config.image_size}px, patch {config.vision_config.patch_size})")


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A temporary sibling folder that becomes `out` once the body finished."""
    _refuse_existing(out)
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)  # left by an export that crashed
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _readable_as_umask_allows(staging)
    if out.exists():
        out.rmdir()
    os.replace(staging, out)
    log.info("wrote %s", out)


def _readable_as_umask_allows(folder: Path) -> None:
    """Files as a plain write would leave them (0644 under the usual umask): some writers go
    through private temporary files (mode 0600), which would keep the model from its other users."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _refuse_existing(out: Path) -> None:
    # Checked before the consolidation too, which takes minutes for a 7B model.
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not an empty folder; choose a new --out or remove it")


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED_KEYS])
    return shown + (f", … ({len(names) - _MAX_LISTED_KEYS} more)" if len(names) > _MAX_LISTED_KEYS else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="RUN_DIR/checkpoints")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest complete)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")
    parser.add_argument("--format", choices=["projector", "hf", "lora"], default="hf",
                        help="hf: a transformers Llava folder (LoRA merged in); lora: a LoRA run's adapter "
                        "in peft's format, with the base Llava in OUT/base")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="hf, lora: dtype of the written weights (default: the one the run trained in, "
                        "from its deepspeed.json: bf16 for GPU runs, fp32 for CPU runs; fp32: the optimizer's "
                        "master weights unchanged). The projector format always writes the fp32 masters")
    parser.add_argument("--config", type=Path, default=None,
                        help="the run's resolved config (default: config.yaml next to --checkpoint)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="hf: overrides of the run config (e.g. a moved model.llm)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.format == "projector":
            if args.overrides or args.config or args.dtype:
                parser.error("--config, --dtype and overrides apply to --format hf and lora only")
            written = export_projector(args.checkpoint, args.out, args.step)
        else:
            written = export_hf(args.checkpoint, args.out, args.step, args.config, args.overrides,
                                adapter=args.format == "lora", dtype=args.dtype)
    except (ExportError, CheckpointError) as err:
        raise SystemExit(f"export error: {err}") from None
    print(f"exported {written}", flush=True)


if __name__ == "__main__":
    run_as_process(lambda: main(sys.argv[1:]))
