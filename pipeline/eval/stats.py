"""The statistics every eval report carries: a rate with its 95% Wilson interval, and how far two
judges agree (Cohen's kappa with the confusion counts it is computed from).

Wilson rather than the normal approximation: eval sets are small per scenario (FigStep: 50 per
topic, SafeBench-Tiny: 5) and rates sit near 0 or 1, where p ± 1.96·sqrt(p(1-p)/n) leaves [0, 1]
and collapses to a point at 0 and n. scipy's `binomtest(...).proportion_ci(method="wilson")` is the
formula; scikit-learn's `cohen_kappa_score` the agreement.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

from scipy.stats import binomtest
from sklearn.metrics import cohen_kappa_score

CONFIDENCE = 0.95


def wilson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The Wilson score interval of k successes in n trials; None for n = 0 (nothing was asked)."""
    if n == 0:
        return None
    interval = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(interval.low), float(interval.high))


def rate(k: int, n: int) -> dict:
    """{"rate", "ci": [lo, hi], "k", "n"}; rate and ci None when n = 0."""
    interval = wilson(k, n)
    return {"rate": k / n if n else None, "ci": list(interval) if interval else None, "k": k, "n": n}


def agreement(first: Sequence[bool], second: Sequence[bool], names: tuple[str, str]) -> dict:
    """Cohen's kappa of two judges' decisions on the same items, with the 2×2 counts.

    `both`, `neither`: both judges said True / False; `<name>_only`: only that judge said True.
    kappa is None when it is undefined: no items, or both judges constant and equal (chance
    agreement 1: kappa = 0/0).
    """
    if len(first) != len(second):
        raise ValueError(f"agreement needs decisions on the same items, got {len(first)} and {len(second)}")
    a, b = names
    counts = {"both": 0, f"{a}_only": 0, f"{b}_only": 0, "neither": 0}
    for x, y in zip(first, second):
        key = "both" if x and y else f"{a}_only" if x else f"{b}_only" if y else "neither"
        counts[key] += 1
    kappa = None
    if first:
        with warnings.catch_warnings():  # sklearn warns on 0/0 (UndefinedMetricWarning) and returns nan
            warnings.simplefilter("ignore")
            value = float(cohen_kappa_score(list(first), list(second), labels=[False, True]))
        kappa = None if math.isnan(value) else value
    return {"kappa": kappa, "n": len(first), "confusion": counts}
