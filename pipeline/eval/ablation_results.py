"""Results of an ablation suite: what the evaluations of every ablation and seed wrote, averaged over
seeds, as results.json, a markdown table (results.md) and a figure (results.png).

Per ablation and seed, from its eval_dir (the formats of the tools that write them):

- dsr/summary.json (pipeline.eval.dsr on the toxic images): DSR image/text overall and per concept,
  answered_toxic image;
- over_refusal/summary.json (the same tool on benign images with the same questions): its refusal
  rates are the over-refusal rates;
- ability/summary.json (pipeline.eval.ability): token F1, exact match;
- alignment/alignment.json (pipeline.analysis.alignment on the toxic images' retrieval join):
  image <-> caption cosine per layer; cos_safety_layers is its mean over the model's TGA layers
  (the export's tga_training.json names them).

An evaluation that did not run gives None. Means and spreads (population std) are over the seeds
that have the value.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.train.plots import save_png

HEADLINE = ("dsr_image", "dsr_text", "over_refusal_image", "over_refusal_text", "answered_toxic_image",
            "ability_f1", "ability_em", "cos_safety_layers")
SPREAD = ("dsr_image", "dsr_text", "over_refusal_image")  # shown with their spread over seeds
TRAINING_FILE = "tga_training.json"  # what pipeline.export writes next to the weights
MODALITIES = ("image", "text")


@dataclasses.dataclass(frozen=True)
class SeedOutputs:
    """Where one seed of one ablation left its results."""
    seed: int
    eval_dir: Path
    model: Path                         # the HF export that was evaluated
    configured_layers: tuple[int, ...]  # the stage-2 config's tga.layers: used if the export names none


def safety_layers(outputs: SeedOutputs) -> list[int]:
    """The layers TGA aligned: the export's record of its training first, else the config's."""
    training = _read(outputs.model / TRAINING_FILE) or {}
    return list(training.get("tga_layers") or outputs.configured_layers)


def seed_results(outputs: SeedOutputs) -> dict:
    """One seed's numbers, read from the files its evaluations wrote."""
    dsr, over_refusal, ability = (_read(outputs.eval_dir / name / "summary.json")
                                  for name in ("dsr", "over_refusal", "ability"))
    alignment = _read(outputs.eval_dir / "alignment" / "alignment.json")
    per_layer = {layer: values["mean"] for layer, values in alignment["layers"].items()} if alignment else {}
    layers = safety_layers(outputs)
    by_concept = (dsr or {}).get("by_concept", {})
    return {
        "seed": outputs.seed,
        "dsr_image": _get(dsr, "dsr", "image"), "dsr_text": _get(dsr, "dsr", "text"),
        "over_refusal_image": _get(over_refusal, "dsr", "image"),
        "over_refusal_text": _get(over_refusal, "dsr", "text"),
        "answered_toxic_image": _get(dsr, "answered_toxic", "image"),
        "ability_f1": _get(ability, "token_f1"), "ability_em": _get(ability, "exact_match"),
        "cos_safety_layers": _mean([per_layer.get(str(layer)) for layer in layers]),
        "per_concept": {c: {m: values[m] for m in MODALITIES} for c, values in by_concept.items()},
        "per_layer_cos": per_layer,
        "safety_layers": layers,
    }


def aggregate(per_seed: list[dict]) -> dict:
    """One ablation's results.json entry: means over seeds, the spread of DSR, the per-seed values."""
    concepts = sorted({c for s in per_seed for c in s["per_concept"]})
    layers = sorted({int(layer) for s in per_seed for layer in s["per_layer_cos"]})
    return {
        **{key: _mean([s[key] for s in per_seed]) for key in HEADLINE},
        "seed_std": {key: _std([s[key] for s in per_seed]) for key in SPREAD},
        "per_concept": {c: {m: _mean([s["per_concept"].get(c, {}).get(m) for s in per_seed]) for m in MODALITIES}
                        for c in concepts},
        "per_layer_cos": {str(layer): _mean([s["per_layer_cos"].get(str(layer)) for s in per_seed])
                          for layer in layers},
        "safety_layers": per_seed[0]["safety_layers"],
        "seeds": [{key: s[key] for key in ("seed", *HEADLINE)} for s in per_seed],
    }


def collect(suite: dict[str, list[SeedOutputs]]) -> dict:
    """results.json: {ablation name: aggregate over its seeds}, in the suite's order."""
    return {name: aggregate([seed_results(outputs) for outputs in seeds]) for name, seeds in suite.items()}


def markdown(results: dict, *, seeds: list[int], command: str) -> str:
    several = len(seeds) > 1
    header = ["ablation", "DSR image" + (" ± std over seeds" if several else ""), "DSR text",
              "over-refusal (image)", "token F1", "EM", "cos at safety layers"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in results.items():
        image = _cell(entry["dsr_image"])
        if several and entry["dsr_image"] is not None:
            image += f" ± {_cell(entry['seed_std']['dsr_image'])}"
        cells = [name, image, *(_cell(entry[k]) for k in ("dsr_text", "over_refusal_image", "ability_f1",
                                                            "ability_em", "cos_safety_layers"))]
        lines.append("| " + " | ".join(cells) + " |")
    layers = {tuple(entry["safety_layers"]) for entry in results.values()}
    shown_layers = "; ".join(", ".join(map(str, group)) for group in sorted(layers))
    lines += ["", f"Seeds: {', '.join(map(str, seeds))}. Safety layers (hidden_states index): {shown_layers}. "
                  "— = not evaluated.", "", f"Command: `{command}`", ""]
    return "\n".join(lines)


def figure(results: dict) -> Figure:
    """Left: DSR image and text per ablation, and the refusal rate of the same questions about benign
    images (error bars: std over seeds). Right: cosine per layer."""
    fig = Figure(figsize=(12, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    bars, lines = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    names = list(results)
    width = 0.27
    for offset, key, label in ((-width, "dsr_image", "DSR image"), (0.0, "dsr_text", "DSR text"),
                               (width, "over_refusal_image", "refusals of benign images")):
        values = [_plotted(results[n][key]) for n in names]
        errors = [_plotted(results[n]["seed_std"][key], missing=0.0) for n in names]
        bars.bar([i + offset for i in range(len(names))], values, width, yerr=errors, capsize=4, label=label)
    bars.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    bars.set_ylim(0, 1.05)
    bars.set_ylabel("refusal rate (on toxic requests: DSR)")
    bars.set_title("refusals: toxic image vs text, and benign images")
    bars.legend(fontsize=8)
    for name in names:
        per_layer = results[name]["per_layer_cos"]
        layers = [int(layer) for layer in per_layer]
        lines.plot(layers, [_plotted(v) for v in per_layer.values()], marker="o", label=name)
    for layer in sorted({layer for entry in results.values() for layer in entry["safety_layers"]}):
        lines.axvspan(layer - 0.5, layer + 0.5, color="tab:gray", alpha=0.12, lw=0)
    lines.set_xlabel("layer (hidden_states index; shaded: TGA layers)")
    lines.set_ylabel("cosine(toxic image, its caption)")
    lines.set_title("image <-> caption alignment per layer")
    lines.legend(fontsize=8)
    return fig


def write(out: Path, results: dict, *, seeds: list[int], command: str) -> list[Path]:
    """results.json, results.md and results.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.json", out / "results.md", out / "results.png"]
    files[0].write_text(json.dumps(results, indent=2) + "\n")
    files[1].write_text(markdown(results, seeds=seeds, command=command))
    save_png(figure(results), files[2])
    return files


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _get(summary: dict | None, *keys: str):
    for key in keys:
        if not isinstance(summary, dict):
            return None
        summary = summary.get(key)
    return summary


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _std(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.pstdev(present) if present else None


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _plotted(value: float | None, missing: float = math.nan) -> float:
    return missing if value is None else value
