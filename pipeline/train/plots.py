"""Per-layer image–caption alignment plots (PNG) for the MLflow run.

Figures are built with matplotlib's object API on an Agg canvas, never pyplot: no global figure
registry that leaks memory over a days-long run, and no GUI backend picked up from a cluster node's
environment.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# (step, {layer: cosine}) snapshots, oldest first: what the loop keeps between plots.
CosineHistory = Sequence[tuple[int, Mapping[int, float]]]


def layer_cosine_figure(cosines: Mapping[int, float], *, step: int | None = None,
                        history: CosineHistory = ()) -> Figure:
    """Bars of the image–caption cosine per aligned layer; with `history`, one line per layer over steps."""
    if not cosines:
        raise ValueError("layer_cosine_figure: no layers given (cosines is empty)")
    layers = sorted(cosines)
    values = [float(cosines[layer]) for layer in layers]
    seen = [v for v in values if math.isfinite(v)]
    seen += [float(c) for _, snapshot in history for c in snapshot.values() if math.isfinite(float(c))]
    # Cosine is at most 1: a fixed top keeps the plots of successive steps on one scale, so they
    # compare by eye; the bottom only moves when some layer is negatively aligned.
    ylim = (min([0.0, *seen]) - 0.05, 1.05)

    fig = Figure(figsize=(11 if history else 6, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    bars_ax = fig.add_subplot(1, 2 if history else 1, 1)
    bars = bars_ax.bar([str(layer) for layer in layers], values, color="tab:blue")
    bars_ax.bar_label(bars, fmt="%.3f", fontsize=8)
    bars_ax.set_ylim(*ylim)
    bars_ax.set_xlabel("LLM layer")
    bars_ax.set_ylabel("cosine(image, caption)")
    bars_ax.set_title("image–caption alignment" + (f" at step {step}" if step is not None else ""))

    if history:
        lines_ax = fig.add_subplot(1, 2, 2)
        for layer in layers:
            points = [(s, float(snapshot[layer])) for s, snapshot in history if layer in snapshot]
            if points:
                steps, cos = zip(*points)
                lines_ax.plot(steps, cos, marker=".", label=f"layer {layer}")
        lines_ax.set_ylim(*ylim)
        lines_ax.set_xlabel("step")
        lines_ax.set_ylabel("cosine(image, caption)")
        lines_ax.set_title("alignment over training")
        lines_ax.legend(fontsize=8, loc="lower right")
    return fig


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
