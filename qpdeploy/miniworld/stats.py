"""Means with 95% confidence intervals for the miniworld's benchmark tables.

A table cell averages per-image values (1/0 for "recognised", "matches the prompt"...) over
several runs (subjects x seeds). Images of one run share a trained model, so they are not
independent: :func:`bootstrap_mean` resamples at both levels, runs with replacement and then
images within each resampled run, which is the bootstrap "over images and seeds" that gate 4
of issue 9 asks for. Two cells differ for the benchmark only when their intervals do not
overlap (:func:`separated`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


def bootstrap_mean(groups: Sequence[Sequence[float]], resamples: int = RESAMPLES, level: float = LEVEL,
                   seed: int = 0) -> dict[str, float]:
    """Mean of all values and a two-level percentile bootstrap interval.

    Args:
        groups: per run (say, one subject and seed), the per-image values; runs may differ in size.
        resamples: bootstrap replicates.
        level: coverage of the interval.

    Returns:
        ``mean`` (over runs of each run's mean, so every run weighs the same), ``low``,
        ``high`` and ``n`` (values) and ``runs``. With a single run only images are resampled.
    """
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    arrays = [a[np.isfinite(a)] for a in arrays]
    arrays = [a for a in arrays if a.size]
    if not arrays:
        raise ValueError("no finite values to average")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for r in range(resamples):
        runs = rng.integers(len(arrays), size=len(arrays)) if len(arrays) > 1 else [0]
        means[r] = np.mean([arrays[i][rng.integers(arrays[i].size, size=arrays[i].size)].mean() for i in runs])
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"mean": float(np.mean([a.mean() for a in arrays])), "low": float(low), "high": float(high),
            "n": int(sum(a.size for a in arrays)), "runs": len(arrays)}


def bootstrap_paired_difference(pairs: Sequence[tuple[Sequence[float], Sequence[float]]],
                                resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> dict[str, float]:
    """Mean of A - B over paired runs (the same subject and seed under two methods) with a
    two-level bootstrap interval: pairs with replacement, then each side's images.

    Pairing removes what the two methods share (how hard the subject is), so it can
    separate two methods whose own intervals overlap.

    Returns:
        ``mean`` (of the per-pair differences of means), ``low``, ``high``, ``pairs``.
    """
    arrays = [(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)) for a, b in pairs]
    if not arrays or any(a.size == 0 or b.size == 0 for a, b in arrays):
        raise ValueError("every pair needs values on both sides")
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for r in range(resamples):
        picked = rng.integers(len(arrays), size=len(arrays))
        diffs[r] = np.mean([arrays[i][0][rng.integers(arrays[i][0].size, size=arrays[i][0].size)].mean()
                            - arrays[i][1][rng.integers(arrays[i][1].size, size=arrays[i][1].size)].mean()
                            for i in picked])
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    return {"mean": float(np.mean([a.mean() - b.mean() for a, b in arrays])), "low": float(low),
            "high": float(high), "pairs": len(arrays)}


def separated(a: dict[str, float], b: dict[str, float]) -> bool:
    """True when two :func:`bootstrap_mean` intervals do not overlap (a difference the
    benchmark calls real)."""
    return a["high"] < b["low"] or b["high"] < a["low"]


def cell(stat: dict[str, float], digits: int = 2) -> str:
    """``0.71 [0.64, 0.78]``: a table cell."""
    return f"{stat['mean']:.{digits}f} [{stat['low']:.{digits}f}, {stat['high']:.{digits}f}]"
