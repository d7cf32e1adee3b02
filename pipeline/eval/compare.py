"""Several models' DSR results side by side, per benchmark, split and scenario, with 95% intervals.

    python -m pipeline.eval.compare DIR [DIR ...] --out OUT [--names A B ...]
        [--mlflow-uri URI] [--mlflow-experiment NAME] [--no-mlflow]

Each DIR is one model: every DSR output below it (a folder with samples.jsonl and a summary.json
of `pipeline.eval.dsr`, e.g. an ablation's eval_dir with dsr/ and over_refusal/, or one folder per
benchmark) is one evaluation of that model. The benchmark is the records' `benchmark` field
(python -m pipeline.eval.benchmarks writes it), else the eval file's name. Rates are recomputed
from samples.jsonl by dsr_summary's own code, so every cell carries its Wilson interval and the
judge it comes from: `refusal` (the refusal judge, refused / asked; on a split that expects
answers this is over-refusal) and, where Llama Guard ran, `guard_safe` (answers judged safe /
judged) with Cohen's kappa between the two.

Writes OUT/compare.md (a table per benchmark), OUT/compare.json, OUT/compare.png (overall rate per
split and model, with the intervals) and logs the three into an MLflow run (default store
sqlite:///OUT/mlflow.db, experiment `tga-compare`).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.eval.dsr_summary import MODALITIES, by_split, guard_summary
from pipeline.mlflow_client import (embedded_tracking_uri, git_commit, log_files, log_values, param_strings,
                                    send_or_warn, tool_experiment)
from pipeline.train.plots import save_png

ALL = "(all)"
DEFAULT_EXPERIMENT = "tga-compare"


class CompareError(ValueError):
    """An input that holds no DSR result, or results that cannot be put side by side."""


def find_evaluations(folder: Path) -> dict[str, list[dict]]:
    """Benchmark name -> samples.jsonl rows, for every DSR output below `folder`."""
    found: dict[str, list[dict]] = {}
    for samples in sorted(Path(folder).rglob("samples.jsonl")):
        summary_file = samples.parent / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        if "dsr" not in summary or "counts" not in summary:
            continue  # another tool's samples (ability)
        rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
        name = summary.get("benchmark") or Path(summary.get("run", {}).get("data", samples.parent.name)).stem
        if name in found:
            raise CompareError(f"{folder}: two evaluations of benchmark {name!r} ({samples.parent} and an earlier "
                               "one); give one folder per model whose evaluations differ in benchmark")
        found[name] = rows
    if not found:
        raise CompareError(f"{folder}: no DSR output below it (samples.jsonl + summary.json of pipeline.eval.dsr)")
    return found


def table(models: dict[str, dict[str, list[dict]]]) -> dict:
    """{benchmark: [{split, modality, scenario, expect, models: {name: {refusal, guard_safe?}}}]} with each
    split's overall row (scenario "(all)") before its scenarios, and per benchmark each model's kappa."""
    result = {}
    for benchmark in sorted({b for evaluations in models.values() for b in evaluations}):
        splits = {name: by_split(ev[benchmark]) for name, ev in models.items() if benchmark in ev}
        rows = []
        for split in sorted({s for entry in splits.values() for s in entry}):
            for modality in MODALITIES:
                present = {n: e[split][modality] for n, e in splits.items() if modality in e.get(split, {})}
                if not present:
                    continue
                expect = next(e[split]["expect"] for e in splits.values() if split in e)
                scenarios = sorted({c for cell in present.values() for c in cell["by_concept"]})
                rows.append(_row(split, modality, ALL, expect, {n: _judged(c) for n, c in present.items()}))
                rows += [_row(split, modality, s, expect, {n: _judged(c["by_concept"][s]) for n, c in present.items()
                                                          if s in c["by_concept"]}) for s in scenarios]
        kappa = {name: guard_summary(ev[benchmark])["agreement"]["all"] for name, ev in models.items()
                 if benchmark in ev and any("guard_safe" in r for r in ev[benchmark])}
        result[benchmark] = {"rows": rows, "agreement": kappa}
    return result


def markdown(result: dict, names: list[str]) -> str:
    lines = ["# DSR side by side", "",
             "Each cell: rate [95% Wilson interval] (k/n). `refusal`: the refusal judge (refused / asked); on a "
             "split that expects answers it is over-refusal (lower is better). `guard`: Llama Guard, answers "
             "judged safe / judged (unparsed left out).", ""]
    for benchmark, entry in result.items():
        guard = any("guard_safe" in cell for row in entry["rows"] for cell in row["models"].values())
        header = ["split", "modality", "scenario", "expects",
                  *[f"{n} {j}" for n in names for j in (("refusal", "guard") if guard else ("refusal",))]]
        lines += [f"## {benchmark}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in entry["rows"]:
            cells = []
            for name in names:
                cell = row["models"].get(name, {})
                cells.append(_shown(cell.get("refusal")))
                if guard:
                    cells.append(_shown(cell.get("guard_safe")))
            lines.append("| " + " | ".join([row["split"], row["modality"], row["scenario"], row["expect"], *cells]) + " |")
        for name, agreement in entry["agreement"].items():
            kappa = agreement["kappa"]
            lines.append(f"\nAgreement of the judges for {name} (queries expecting a refusal): kappa "
                         f"{'n/a' if kappa is None else f'{kappa:.3f}'}, {agreement['confusion']}")
        lines.append("")
    return "\n".join(lines)


def figure(result: dict, names: list[str]) -> Figure:
    """Per benchmark: the overall refusal rate of each split and modality, one bar per model, with
    the Wilson intervals as error bars."""
    fig = Figure(figsize=(6 * len(result), 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    width = 0.8 / max(len(names), 1)
    for position, (benchmark, entry) in enumerate(result.items(), start=1):
        axes = fig.add_subplot(1, len(result), position)
        overall = [row for row in entry["rows"] if row["scenario"] == ALL]
        for i, name in enumerate(names):
            cells = [row["models"].get(name, {}).get("refusal") for row in overall]
            values = [c["rate"] if c and c["rate"] is not None else math.nan for c in cells]
            errors = [[v - c["ci"][0] if c and c["ci"] else 0 for v, c in zip(values, cells)],
                      [c["ci"][1] - v if c and c["ci"] else 0 for v, c in zip(values, cells)]]
            axes.bar([j + (i - (len(names) - 1) / 2) * width for j in range(len(overall))], values, width,
                     yerr=errors, capsize=3, label=name)
        axes.set_xticks(range(len(overall)), [f"{r['split']}\n{r['modality']}" + ("\n(over-refusal)" if r["expect"] == "answer"
                                                                              else "") for r in overall], fontsize=8)
        axes.set_ylim(0, 1.05)
        axes.set_ylabel("refusal rate (95% Wilson interval)")
        axes.set_title(benchmark)
        axes.legend(fontsize=8)
    return fig


def metrics_of(result: dict) -> dict[str, float]:
    """<model>/<benchmark>/<split>/<modality>/refusal (and /guard_safe): the overall rows only."""
    metrics = {}
    for benchmark, entry in result.items():
        for row in (r for r in entry["rows"] if r["scenario"] == ALL):
            for name, cell in row["models"].items():
                for judge, value in cell.items():
                    if value["rate"] is not None:
                        metrics[f"{_key(name)}/{_key(benchmark)}/{_key(row['split'])}/{row['modality']}/{judge}"] = \
                            value["rate"]
    return metrics


def write(out: Path, result: dict, names: list[str]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "compare.md", out / "compare.json", out / "compare.png"]
    files[0].write_text(markdown(result, names))
    files[1].write_text(json.dumps({"models": names, "benchmarks": result}, indent=2) + "\n")
    save_png(figure(result, names), files[2])
    return files


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pipeline.eval.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="one folder per model (run, eval or ablation eval dir)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--names", nargs="+", default=None, help="the models' names (default: the folder names)")
    parser.add_argument("--mlflow-uri", default=None, help="tracking URI (default: sqlite:///OUT/mlflow.db)")
    parser.add_argument("--mlflow-experiment", default=DEFAULT_EXPERIMENT)
    parser.add_argument("--no-mlflow", action="store_true", help="write the files only")
    args = parser.parse_args(argv)
    names = args.names or [folder.name for folder in args.folders]
    if len(names) != len(args.folders) or len(set(names)) != len(names):
        parser.error("--names needs one distinct name per folder (folder names must differ without it)")
    try:
        models = {name: find_evaluations(folder) for name, folder in zip(names, args.folders)}
    except CompareError as err:
        raise SystemExit(f"compare error: {err}") from None
    result = table(models)
    files = write(args.out, result, names)
    print(files[0].read_text())
    if not args.no_mlflow:
        uri = args.mlflow_uri or embedded_tracking_uri(args.out)
        send_or_warn(uri, "comparison", lambda client: _log(client, uri, args.mlflow_experiment, result, files, names))
    print(f"wrote {', '.join(str(f) for f in files)}")
    return result


def _log(client, uri: str, experiment: str, result: dict, files: list[Path], names: list[str]) -> str:
    run_id = client.create_run(tool_experiment(client, uri, experiment), run_name="compare",
                               tags={"git_commit": git_commit()}).info.run_id
    log_values(client, run_id, metrics=metrics_of(result),
               params=param_strings({"models": " ".join(names), "benchmarks": " ".join(result)}))
    log_files(client, run_id, files)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _row(split: str, modality: str, scenario: str, expect: str, models: dict) -> dict:
    return {"split": split, "modality": modality, "scenario": scenario, "expect": expect, "models": models}


def _judged(entry: dict) -> dict:
    return {judge: entry[judge] for judge in ("refusal", "guard_safe") if judge in entry}


def _shown(value: dict | None) -> str:
    if value is None or value["rate"] is None:
        return "—"
    return f"{value['rate']:.2f} [{value['ci'][0]:.2f}, {value['ci'][1]:.2f}] ({value['k']}/{value['n']})"


def _key(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in text)


if __name__ == "__main__":
    main(sys.argv[1:])
