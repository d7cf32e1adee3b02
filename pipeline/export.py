"""Export a ZeRO-3 checkpoint: the stage-1 projector file, or a transformers Llava folder.

    python -m pipeline.export --checkpoint RUN_DIR/checkpoints [--step N] --out OUT \\
        [--format projector|hf] [--config RUN_DIR/config.yaml] [key.sub=value ...]

Both formats start from DeepSpeed's zero_to_fp32 consolidation of one complete checkpoint (default:
the one `latest` names), so an export never needs the ranks, GPUs or DeepSpeed engine that trained.

- `projector`: OUT/projector.safetensors, the same file the stage-1 loop writes at its end
  (`model.projector` of the next stage, or `load_projector`).
- `hf`: a folder that `AutoModelForImageTextToText.from_pretrained(OUT)` and
  `AutoProcessor.from_pretrained(OUT)` load with plain transformers: `LlavaForConditionalGeneration`
  safetensors + config, the tokenizer with the training chat template, and a `LlavaProcessor`
  whose image preprocessing and `<image>` expansion are the ones training used. The model paths
  and the template come from the run's resolved config (`RUN_DIR/config.yaml`, written by the loop).
  A LoRA run's adapters are merged in (no peft needed to load it).
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
from pipeline.data.llava import IMAGE_TOKEN
from pipeline.model.assemble import AssembledModel, apply_freeze, build_llava, projector_state_dict, save_projector
from pipeline.model.lora import add_lora
from pipeline.tga.templates import get_template, template_source
from pipeline.train.checkpoint import (CheckpointError, export_full_state_dict, latest_complete_step,
                                       saved_steps, step_tag)
from pipeline.train.config import TrainConfig
from pipeline.train.run_folder import RunFolder

_PROJECTOR = RunFolder(".").projector.name  # same file name as the stage-1 loop writes
log = logging.getLogger("pipeline.export")

TRAINING_INFO = "tga_training.json"  # in an hf export: prompt, TGA layers and MLflow run of the training
# The skeleton is only a container for the consolidated fp32 weights: built on CPU in fp32, without
# the stage-1 projector file a stage-2 config points at (the checkpoint holds the trained one).
_SKELETON_OVERRIDES = ["model.projector=null", "model.dtype=fp32", "model.attn_implementation=sdpa",
                       "model.gradient_checkpointing=false"]
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


def consolidate(ckpt_dir: str | Path, step: int | None) -> tuple[int, dict[str, torch.Tensor]]:
    """(step, full fp32 state dict) of a complete checkpoint, via DeepSpeed's zero_to_fp32."""
    step = resolve_step(ckpt_dir, step)
    log.info("consolidating %s", Path(ckpt_dir) / step_tag(step))
    return step, export_full_state_dict(ckpt_dir, step)


def export_projector(ckpt_dir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """OUT/projector.safetensors from checkpoint `step` (default: latest complete)."""
    _refuse_existing(Path(out))
    step, state = consolidate(ckpt_dir, step)
    with _staged(Path(out)) as staging:
        save_projector(projector_state_dict(state), staging / _PROJECTOR)
    return Path(out) / _PROJECTOR


def run_config(ckpt_dir: str | Path, config: str | Path | None = None,
               overrides: list[str] = ()) -> TrainConfig:
    """The resolved training config of the run that wrote `ckpt_dir` (default: its config.yaml)."""
    path = Path(config) if config is not None else RunFolder.of_checkpoints(ckpt_dir).config
    if not path.is_file():
        raise ExportError(f"{path}: no run config (the training loop writes {path.name} next to "
                          "checkpoints/); pass --config with the run's resolved config")
    try:
        return load_config(TrainConfig, path, [*_SKELETON_OVERRIDES, *overrides])
    except ConfigError as err:
        raise ExportError(f"{err}\nThe export needs the run's model folders (model.*); fix a moved or "
                          "deleted path with a key=value override on the command line "
                          "(e.g. shards=<any existing folder> if the training shards are gone)") from None


def export_hf(ckpt_dir: str | Path, out: str | Path, step: int | None = None,
              config: str | Path | None = None, overrides: list[str] = (), adapter: bool = False) -> Path:
    """A transformers Llava folder (model, tokenizer, chat template, processor) from checkpoint `step`.

    A LoRA run's adapters are merged into the LLM's linears: the folder needs no peft. With
    `adapter` (a LoRA run only) OUT instead holds the adapter in peft's format and OUT/base the
    Llava it applies to: `PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(
    OUT/base), OUT)`.
    """
    _refuse_existing(Path(out))
    step = resolve_step(ckpt_dir, step)
    cfg = run_config(ckpt_dir, config, overrides)
    if adapter and cfg.lora is None:
        raise ExportError(f"{ckpt_dir}: --format lora needs a run with a lora section; this one trained "
                          f"{cfg.trainable} fully (use --format hf)")
    # Model folders and processor first: their errors come in seconds, the consolidation takes minutes.
    assembled = build_llava(cfg.model, "cpu")
    peft_model = add_lora(assembled.model, cfg.lora) if cfg.lora is not None else None
    trained = apply_freeze(assembled.model, cfg.trainable, lora=peft_model is not None)
    processor = build_processor(assembled, cfg)
    step, state = consolidate(ckpt_dir, step)
    # a LoRA checkpoint holds what trained; the frozen rest is the model folders' own weights
    load_full_state(assembled.model, state, Path(ckpt_dir) / step_tag(step),
                    required=set(trained) if peft_model is not None else None)
    del state  # a second full copy of the weights (28 GB in fp32 for a 7B LLM)
    info = training_info(cfg, Path(ckpt_dir), step)
    with _staged(Path(out)) as staging:
        if adapter:
            peft_model.peft_config["default"].base_model_name_or_path = str(Path(out).resolve() / "base")
            peft_model.save_pretrained(staging)
            _save_model_folder(peft_model.unload(), processor, info, staging / "base")
        else:
            model = peft_model.merge_and_unload() if peft_model is not None else assembled.model
            _save_model_folder(model, processor, info, staging)
    return Path(out)


def _save_model_folder(model: torch.nn.Module, processor, info: dict, folder: Path) -> None:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / TRAINING_INFO).write_text(json.dumps(info, indent=2) + "\n")


def training_info(cfg: TrainConfig, ckpt_dir: Path, step: int) -> dict:
    """What the evaluation tools need to know about how the exported model was trained: the prompt
    (so DSR inserts the retrieved text exactly as training did), the TGA layers, and the MLflow run
    (so their reports land next to the training curves). Folders from elsewhere simply lack it."""
    run = RunFolder.of_checkpoints(ckpt_dir)
    tracking = run.read_tracking() or {}
    return {
        "stage": cfg.stage,
        "step": step,
        "run_dir": str(run.path.resolve()),
        "tracking_uri": tracking.get("tracking_uri"),
        "run_id": tracking.get("run_id"),
        "prompt": dataclasses.asdict(cfg.prompt),
        "tga_layers": list(cfg.tga.layers),
    }


def load_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path,
                    required: set[str] | None = None) -> None:
    """Copy a consolidated state dict into `model`; every name and shape must match. `required`:
    the names the state must hold when it holds only part of the model (the trained weights)."""
    expected = model.state_dict()
    missing = sorted((set(expected) if required is None else required) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ExportError(
            f"{source}: the checkpoint's weights do not match the model built from the run config "
            f"(other LLM / vision tower / tokenizer than in training?)\n"
            f"  missing from the checkpoint ({len(missing)}): {_listed(missing)}\n"
            f"  not in the model ({len(unexpected)}): {_listed(unexpected)}")
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if wrong:
        raise ExportError(f"{source}: {len(wrong)} weight(s) differ in shape from the model built from "
                          f"the run config: {_listed(wrong)}")
    with torch.no_grad():
        model.load_state_dict(state, strict=required is None)


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
    if out.exists():
        out.rmdir()
    os.replace(staging, out)
    log.info("wrote %s", out)


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
    parser.add_argument("--config", type=Path, default=None,
                        help="the run's resolved config (default: config.yaml next to --checkpoint)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="hf: overrides of the run config (e.g. a moved model.llm)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.format == "projector":
            if args.overrides or args.config:
                parser.error("--config and overrides apply to --format hf only")
            written = export_projector(args.checkpoint, args.out, args.step)
        else:
            written = export_hf(args.checkpoint, args.out, args.step, args.config, args.overrides,
                                adapter=args.format == "lora")
    except (ExportError, CheckpointError) as err:
        raise SystemExit(f"export error: {err}") from None
    print(f"exported {written}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
