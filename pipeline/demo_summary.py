"""The last thing `make demo` prints: one table of what the demo measured, and where to look next.

    python -m pipeline.demo_summary [--work work]

Reads only what the tools wrote (the eval tools' summary.json files, the alignment report, the
export's tga_training.json), the same way the ablation suite reads them (ablation_results), so the
numbers are comparable with row iii of the README's table. Writes beside them:
`eval/stage2/dsr_by_concept.png` (DSR per concept, image vs text, with the over-refusal rate) and
`eval/stage2/summary.md` (the table printed here).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.eval.ablation_results import SeedOutputs, seed_results
from pipeline.process_exit import run_as_process
from pipeline.train.plots import save_png

EXPORT = Path("export/stage2-hf")
EVAL = Path("eval/stage2")
MLFLOW_STORE = Path("runs/stage2/mlflow.db")
RUNS = ("runs/stage1", "runs/stage2")


@dataclasses.dataclass(frozen=True)
class DemoFiles:
    """Where `make demo` leaves each product under its work folder."""
    work: Path

    @property
    def export(self) -> Path:
        return self.work / EXPORT

    @property
    def eval_dir(self) -> Path:
        return self.work / EVAL

    def report(self, tool: str, name: str = "summary.json") -> dict | None:
        path = self.eval_dir / tool / name
        return json.loads(path.read_text()) if path.is_file() else None


def numbers(files: DemoFiles) -> dict:
    """The headline numbers (None where a tool did not run), and the counts behind them."""
    found = seed_results(SeedOutputs(seed=0, eval_dir=files.eval_dir, model=files.export, configured_layers=()))
    dsr, control, ability = files.report("dsr"), files.report("over_refusal"), files.report("ability")
    found["dsr_gap"] = dsr["dsr"]["gap"] if dsr else None
    found["toxic_pictures"] = dsr["counts"]["image"]["asked"] if dsr else None
    found["benign_pictures"] = control["counts"]["image"]["asked"] if control else None
    found["questions"] = ability["n"] if ability else None
    return found


def table(found: dict) -> str:
    """A markdown table: metric, value, what it counts."""
    layers = ", ".join(map(str, found["safety_layers"])) or "none recorded"
    rows = [
        ("DSR image", "dsr_image", f"refused share of the {_count(found['toxic_pictures'])} toxic pictures' requests"),
        ("DSR text", "dsr_text", "the same requests as text"),
        ("gap (text − image)", "dsr_gap", "what TGA is meant to close"),
        ("over-refusal (image)", "over_refusal_image",
         f"refused share of the same questions about {_count(found['benign_pictures'])} benign pictures"),
        ("ability token F1", "ability_f1", f"{_count(found['questions'])} held-out VQA questions"),
        ("cosine at the TGA layers", "cos_safety_layers",
         f"toxic picture vs its caption, mean over layers {layers}"),
    ]
    lines = ["| metric | value | what it counts |", "|---|---|---|"]
    lines += [f"| {label} | {_shown(found[key])} | {meaning} |" for label, key, meaning in rows]
    return "\n".join(lines)


def concept_figure(found: dict) -> Figure:
    """DSR per concept, image vs text; the dashed line is the over-refusal rate on benign pictures."""
    concepts = sorted(found["per_concept"])
    fig = Figure(figsize=(max(6.0, 0.8 * len(concepts) + 2), 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.add_subplot()
    width = 0.4
    for offset, modality in ((-width / 2, "image"), (width / 2, "text")):
        values = [found["per_concept"][c][modality] or 0.0 for c in concepts]
        axes.bar([i + offset for i in range(len(concepts))], values, width, label=f"DSR {modality}")
    if found["over_refusal_image"] is not None:
        axes.axhline(found["over_refusal_image"], color="tab:gray", linestyle="--",
                     label="over-refusal (benign pictures)")
    axes.set_xticks(range(len(concepts)), concepts, rotation=20, fontsize=8)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("refused share")
    axes.set_title("defence success rate per concept: toxic picture vs the same request as text")
    fig.legend(loc="outside lower center", ncols=3, fontsize=8)  # below the bars, which reach 1.0
    return fig


def where(files: DemoFiles, chart: Path | None) -> list[str]:
    """Lines naming each plot, the model card and the MLflow command, for the files that exist."""
    plots = [chart, files.eval_dir / "alignment" / "alignment.png",
             files.eval_dir / "safety_layers" / "safety_layers.png",
             files.work / "eval" / "llm" / "safety_layers" / "safety_layers.png"]
    plots += [path for run in RUNS for path in sorted((files.work / run / "plots").glob("*.png"))[-1:]]
    lines = ["Plots: " + ", ".join(str(p) for p in plots if p is not None and p.is_file())]
    card = files.export / "README.md"
    if card.is_file():
        lines.append(f"Model card: {card}")
    store = (files.work / MLFLOW_STORE).resolve()
    if store.is_file():
        lines.append(f"MLflow (training curves, eval/ reports): .venv/bin/python -m mlflow ui "
                     f"--backend-store-uri sqlite:///{store}  then open http://127.0.0.1:5000")
    return lines


def summarize(work: Path) -> str:
    """Write the chart and summary.md under work/eval/stage2; returns the text to print."""
    files = DemoFiles(work)
    if files.report("dsr") is None and files.report("ability") is None:
        raise SystemExit(f"demo summary: {files.eval_dir} holds no dsr/ or ability/ summary.json; "
                         "run `make demo` first")
    found = numbers(files)
    chart = None
    if found["per_concept"]:
        chart = save_png(concept_figure(found), files.eval_dir / "dsr_by_concept.png")
    text = "\n".join([f"== What the demo measured ({files.export}, seed 0; README's table, row iii, "
                      "is the same training)", "", table(found), "", *where(files, chart)])
    (files.eval_dir / "summary.md").write_text(text + "\n")
    return text


def _shown(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo_summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("work"), help="the folder `make demo` writes")
    args = parser.parse_args(argv)
    print(summarize(args.work), flush=True)


if __name__ == "__main__":
    run_as_process(lambda: main(sys.argv[1:]))
