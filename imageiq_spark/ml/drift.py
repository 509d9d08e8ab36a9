"""Drift statistics of a window's distribution against its baseline's, computed from counts.

Spark reduces every distribution to counts: per category (labels, formats), or per value on a
fixed grid (a continuous value `v` is counted at `round(v / quantum) * quantum`). A window of a
million predictions reaches the driver as a few thousand (value, count) pairs, and the statistics
below are exact for the gridded values: the same numbers `scipy.stats` gives on them (tests).
The grid moves no value by more than half a quantum (1e-4 for confidence), so on raw values the
KS statistic is off by at most the share of values within half a quantum of the largest gap.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance

#: Share given to a category one side never saw, so that PSI stays finite (a common convention).
PSI_FLOOR = 1e-4


def shares(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return counts / total if total else counts


def psi(baseline: np.ndarray, window: np.ndarray) -> float:
    """Population stability index, sum((w - b) * ln(w / b)) over categories' shares.

    `baseline` and `window` are counts over the same categories, in the same order.
    """
    b = np.clip(shares(baseline), PSI_FLOOR, None)
    w = np.clip(shares(window), PSI_FLOOR, None)
    return float(np.sum((w - b) * np.log(w / b)))


def js_distance(baseline: np.ndarray, window: np.ndarray) -> float:
    """Jensen-Shannon distance in base 2 (0 equal, 1 disjoint) of two count vectors."""
    return float(jensenshannon(shares(baseline), shares(window), base=2))


def cdfs(values_a: np.ndarray, counts_a: np.ndarray, values_b: np.ndarray, counts_b: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both empirical CDFs evaluated at every value either side holds (sorted)."""
    grid = np.union1d(values_a, values_b)

    def cdf(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
        order = np.argsort(values)
        cumulative = np.cumsum(np.asarray(counts, np.float64)[order])
        at = np.searchsorted(np.asarray(values)[order], grid, side="right")
        return np.where(at > 0, cumulative[np.maximum(at - 1, 0)], 0.0) / cumulative[-1]

    return grid, cdf(values_a, counts_a), cdf(values_b, counts_b)


def ks_statistic(values_a: np.ndarray, counts_a: np.ndarray, values_b: np.ndarray,
                 counts_b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic, max |F_a - F_b|, of two counted samples."""
    _, cdf_a, cdf_b = cdfs(values_a, counts_a, values_b, counts_b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def wasserstein(values_a: np.ndarray, counts_a: np.ndarray, values_b: np.ndarray,
                counts_b: np.ndarray) -> float:
    """First Wasserstein (earth mover's) distance of two counted samples."""
    return float(wasserstein_distance(values_a, values_b, counts_a, counts_b))
