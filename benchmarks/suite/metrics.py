"""AUROC and paired differences."""

from __future__ import annotations

import math

import numpy as np


def auroc(score_bad: np.ndarray, bad: np.ndarray) -> float | None:
    """AUROC of ``score_bad`` (higher = more likely bad) for the bool ``bad``; None when one class is absent."""
    bad = np.asarray(bad, dtype=bool)
    if bad.all() or not bad.any():
        return None
    from scipy.stats import rankdata

    ranks = rankdata(score_bad)
    n1 = int(bad.sum())
    n0 = len(bad) - n1
    return float((ranks[bad].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of ``a - b`` paired by position (seed), in points when the inputs are fractions."""
    d = 100 * (np.asarray(a) - np.asarray(b))
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se
