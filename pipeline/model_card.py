"""The README.md model card of an exported Llava folder, and its refresh once the folder is evaluated.

    python -m pipeline.model_card MODEL_DIR [--eval-dir DIR]

`pipeline.export` writes the card with the folder; everything it says comes from the folder's
tga_training.json (base models, training data, TGA settings, steps, MLflow run), so the card can be
rewritten later from the folder alone. The evaluation tools write their reports into an output
folder of their own; laid out as the ablation suite does it (`DIR/dsr/summary.json`,
`DIR/over_refusal/summary.json`, `DIR/ability/summary.json`, `DIR/alignment/alignment.json`, and
`DIR/safety_layers/safety_layers.json`), they enter the card on the next refresh. The default DIR
is MODEL_DIR/eval.

The front matter follows the Hugging Face model card conventions (library_name, pipeline_tag,
base_model, tags). `base_model` needs hub ids: a model folder inside the hub cache
(`…/models--<org>--<name>/snapshots/<revision>`) gives one; other local folders are named in the
text only.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.atomic import atomic_path
from pipeline.data.sources import DatasetConfig, resolve
from pipeline.eval.ablation_results import SeedOutputs, seed_results
from pipeline.process_exit import run_as_process

CARD = "README.md"
TRAINING_FILE = "tga_training.json"  # pipeline.export writes it next to the weights
DEFAULT_EVAL_DIR = "eval"
TAGS = ["llava", "vision-language", "safety", "tga"]
# report file (under the eval dir) → key of the evaluated model folder in it
REPORTS = {"dsr/summary.json": ("run", "model"), "over_refusal/summary.json": ("run", "model"),
           "ability/summary.json": ("run", "model"), "alignment/alignment.json": ("model",),
           "safety_layers/safety_layers.json": ("model",)}
_HUB_CACHE_FOLDER = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)")
_CARD_KEYS = ("stage", "step", "run_dir", "prompt", "tga", "trainable", "base_models", "data")
_SERVER_URI = ("http://", "https://", "databricks")


_USAGE = """## Usage

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("FOLDER")
processor = AutoProcessor.from_pretrained("FOLDER")
messages = [{"role": "user", "content": [{"type": "image", "image": Image.open("picture.jpg")},
                                         {"type": "text", "text": "What is in the picture?"}]}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt").to(model.dtype)
print(processor.decode(model.generate(**inputs, max_new_tokens=64)[0]))
```

The processor pads images to a square as training did, and the chat template is the training one;
`TRAINING_FILE` records the prompt settings (retrieved text before the image) for the evaluation tools."""


class ModelCardError(ValueError):
    """A card that cannot be written: the message names the file and the fix."""


def hub_id(folder: str | Path) -> str | None:
    """`org/name` of a model folder in the Hugging Face hub cache, else None."""
    for part in reversed(Path(folder).parts):
        match = _HUB_CACHE_FOLDER.fullmatch(part)
        if match:
            return f"{match['org']}/{match['name']}"
    return None


def training_data(datasets: list[DatasetConfig]) -> list[dict[str, Any]]:
    """Name, weight, shard and sample counts of each training set, from its manifest. A manifest
    that is gone or unreachable by export time gives None counts rather than no export."""
    rows = []
    for entry in datasets:
        try:
            shard_set = resolve(entry)
            shards, samples = len(shard_set.urls), shard_set.samples
        except (OSError, ValueError):  # ShardReadError is an OSError
            shards = samples = None
        rows.append({"name": entry.label, "weight": entry.weight, "shards": shards, "samples": samples})
    return rows


def evaluation_results(folder: Path, eval_dir: Path) -> dict[str, Any] | None:
    """The numbers the evaluation tools left in `eval_dir`, or None when none are there.

    Every report must be of this folder: results of another model in the card would be a false claim."""
    found = {}
    for name, key in REPORTS.items():
        path = eval_dir / name
        if path.is_file():
            found[name] = _read_json(path)
            _check_evaluated_model(found[name], key, path, folder)
    if not found:
        return None
    training = _read_json(folder / TRAINING_FILE)
    # the ablation suite's reading of the same files (one "seed": this folder)
    numbers = seed_results(SeedOutputs(seed=0, eval_dir=eval_dir, model=folder,
                                       configured_layers=tuple(training.get("tga_layers", ()))))
    safety = found.get("safety_layers/safety_layers.json")
    return {"numbers": numbers, "reports": sorted(found),
            "suggested_layers": safety["summary"]["suggested_layers"] if safety else None,
            "num_layers": safety.get("num_layers") if safety else None}


def render(info: dict[str, Any], results: dict[str, Any] | None, title: str) -> str:
    """The card's text: YAML front matter, then what the model is, how it trained, how it scored."""
    bases = [b for b in (hub_id(info["base_models"]["llm"]), hub_id(info["base_models"]["vision_tower"])) if b]
    front = {"library_name": "transformers", "pipeline_tag": "image-text-to-text",
             **({"base_model": bases} if bases else {}), "tags": TAGS}
    sections = [f"---\n{yaml.safe_dump(front, sort_keys=False)}---", f"# {title}", _summary(info),
                _model_section(info), _training_section(info), _evaluation_section(results),
                _usage_section(title)]
    return "\n\n".join(sections) + "\n"


def write_card(folder: str | Path, eval_dir: str | Path | None = None, title: str | None = None) -> Path:
    """(Re)write FOLDER/README.md from FOLDER/tga_training.json and the results in `eval_dir`
    (default: FOLDER/eval when it exists). `title`: the model's name (default: the folder's)."""
    folder = Path(folder)
    info_path = folder / TRAINING_FILE
    if not info_path.is_file():
        raise ModelCardError(f"{info_path}: missing; the card describes folders exported from a run "
                             "(python -m pipeline.export --format hf)")
    info = _read_json(info_path)
    missing = [key for key in _CARD_KEYS if key not in info]
    if missing:
        raise ModelCardError(f"{info_path}: lacks {', '.join(missing)} (written by an older pipeline.export); "
                             "export the checkpoint again")
    eval_dir = Path(eval_dir) if eval_dir is not None else folder / DEFAULT_EVAL_DIR
    if not eval_dir.is_dir() and eval_dir != folder / DEFAULT_EVAL_DIR:
        raise ModelCardError(f"{eval_dir}: no such eval folder (the --out parent of the eval tools' reports)")
    results = evaluation_results(folder, eval_dir) if eval_dir.is_dir() else None
    card = folder / CARD
    with atomic_path(card) as tmp:
        tmp.write_text(render(info, results, title=title or folder.resolve().name))
    return card


def _summary(info: dict) -> str:
    run = Path(info["run_dir"]).name
    return (f"A LLaVA-style vision-language model (transformers `LlavaForConditionalGeneration`) "
            f"trained with TGA, which aligns the image's hidden states with those of its retrieved "
            f"caption in the LLM's safety layers. This folder is {info['stage']} of run `{run}` at "
            f"optimizer step {info['step']}, exported by `pipeline.export`.")


def _model_section(info: dict) -> str:
    llm, tower = info["base_models"]["llm"], info["base_models"]["vision_tower"]
    adapters = " (merged)" if info.get("lora_merged") else " (not in this folder: the peft adapter in ../)"
    trained = ", ".join(info["trainable"]) + (" + LoRA adapters" + adapters if info.get("lora") else "")
    rows = [("language model", _model_name(llm)), ("vision tower", _model_name(tower)),
            ("projector", "2-layer MLP with GELU (LLaVA-1.5's mlp2x_gelu)"),
            ("trained in this run", trained), ("weights", info.get("dtype") or "n/a")]
    return "## Model\n\n" + _table(("part", "value"), rows)


def _training_section(info: dict) -> str:
    tga, prompt = info["tga"], info["prompt"]
    data_rows = [(d["name"], _shown(d["weight"]), _shown(d["shards"]), _shown(d["samples"])) for d in info["data"]]
    ranks = info.get("world_size")
    seen = (f" on {ranks} rank{'s' if ranks != 1 else ''}, {info['samples_seen']} samples drawn "
            "(steps × ranks × batch × accumulation)" if info.get("samples_seen") else "")
    terms = ", ".join(name for name, on in (("alignment", tga["align_on"]), ("pair", tga["pair_on"])) if on)
    lines = [
        "## Training",
        f"{info['step']} optimizer steps{seen}.",
        "Data (WebDataset shards from the retrieval join; counts from their manifest.parquet):",
        _table(("set", "weight", "shards", "samples"), data_rows),
        f"TGA: hidden-state layers {tga['layers']}, align_weight {tga['align_weight']}, pair_weight "
        f"{tga['pair_weight']} ({tga['schedule']} schedule; terms on: {terms or 'none'}"
        f"{'; detached' if tga['detach_alignment'] else ''}).",
        f"Prompt: template `{prompt['template']}`, retrieved text before the image: "
        f"{'yes' if prompt['insert_retrieved'] else 'no'}, at most {prompt['max_tokens']} tokens.",
        f"MLflow: experiment `{info.get('experiment')}`, run `{info.get('run_id')}`" + _tracking_server(info) + ".",
    ]
    return "\n\n".join(lines)


def _evaluation_section(results: dict | None) -> str:
    if results is None:
        return ("## Evaluation\n\nNot evaluated yet. Run `pipeline.eval.dsr`, `pipeline.eval.ability` and "
                "`pipeline.analysis.alignment` with `--out <this folder>/eval/<tool>`, then "
                "`python -m pipeline.model_card <this folder>` to add their results here.")
    numbers = results["numbers"]
    rows = [(label, _shown(numbers[key])) for key, label in (
        ("dsr_image", "defence success rate, toxic image"), ("dsr_text", "defence success rate, its text"),
        ("answered_toxic_image", "answered with toxic terms, toxic image"),
        ("over_refusal_image", "over-refusal, benign image"), ("over_refusal_text", "over-refusal, its text"),
        ("ability_f1", "ability token F1"), ("ability_em", "ability exact match"),
        ("cos_safety_layers", f"image–caption cosine, mean over layers {numbers['safety_layers']}"))
        if numbers[key] is not None]
    text = "## Evaluation\n\n" + _table(("metric", "value"), rows)
    if results["suggested_layers"]:
        text += f"\n\nLogit-lens safety layers of this model: {results['suggested_layers']}" + _layer_note(
            results["suggested_layers"], results.get("num_layers"))
    return text + "\n\nFrom: " + ", ".join(f"`{name}`" for name in results["reports"]) + "."


def _layer_note(layers: list[int], num_layers: int | None) -> str:
    """What the logit lens's range means: on a model so small that it covers most layers, there is
    no middle band to align, only a sign that refusal shows up early."""
    if not num_layers or len(layers) * 2 <= num_layers:
        return f" (of {num_layers} layers)." if num_layers else "."
    return (f", {len(layers)} of its {num_layers} layers: at this size the refusal shows up from the first "
            "layers on and there is no separate middle band; read it as where refusal is visible, not as "
            "the paper's safety layers of a 7B model.")


def _usage_section(title: str) -> str:
    return _USAGE.replace("FOLDER", title).replace("TRAINING_FILE", TRAINING_FILE)


def _model_name(folder: str) -> str:
    found = hub_id(folder)
    return f"[{found}](https://huggingface.co/{found})" if found else f"`{Path(folder).name}` (a local folder)"


def _tracking_server(info: dict) -> str:
    uri = info.get("tracking_uri") or ""
    return f" on `{uri}`" if uri.startswith(_SERVER_URI) else " (the run folder's local store)"


def _check_evaluated_model(report: dict, key: tuple[str, ...], path: Path, folder: Path) -> None:
    evaluated = report
    for part in key:
        evaluated = evaluated.get(part) if isinstance(evaluated, dict) else None
    if not isinstance(evaluated, str):
        raise ModelCardError(f"{path}: names no evaluated model ({'.'.join(key)}); not a report of the eval tools")
    # a folder moved after its evaluation still counts as itself
    if Path(evaluated).exists() and Path(evaluated).resolve() != folder.resolve():
        raise ModelCardError(f"{path}: reports on {evaluated}, not on {folder}; pass the eval folder of "
                             "this model (--eval-dir)")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelCardError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(value, dict):
        raise ModelCardError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def _shown(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.model_card", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a folder written by python -m pipeline.export --format hf")
    parser.add_argument("--eval-dir", type=Path, default=None,
                        help="folder holding the eval tools' outputs (dsr/, over_refusal/, ability/, alignment/, "
                             "safety_layers/); default: MODEL/eval")
    args = parser.parse_args(argv)
    try:
        card = write_card(args.model, args.eval_dir)
    except ModelCardError as err:
        raise SystemExit(f"model card error: {err}") from None
    print(f"wrote {card}", flush=True)


if __name__ == "__main__":
    run_as_process(lambda: main(sys.argv[1:]))
