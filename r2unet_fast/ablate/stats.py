"""Paired per-image differences between two cells, and their bootstrap confidence interval.

Two cells of one seed are scored on the same test images (same data, split and seed), so
each test image gives one paired difference (Jaccard of cell A minus cell B), paired by
case ID. With several seeds, each seed is a stratum: synthetic data reuses IDs for
different images across seeds, and a seeded split tests different cases per seed, so
images are only ever paired within their seed. The statistic is the mean over seeds of
each seed's mean difference; the bootstrap resamples images with replacement within each
seed (a stratified percentile bootstrap). With one seed this is the plain paired bootstrap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
# Resample indices are drawn in chunks of about this many entries, so a large test set (ISIC's 600
# images x 10000 resamples) never needs one huge index array.
_CHUNK_ENTRIES = 2_000_000


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap interval [low, high] at ``confidence``."""

    mean: float
    low: float
    high: float
    confidence: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def bootstrap_interval(strata: Sequence[Sequence[float]], *, resamples: int = BOOTSTRAP_RESAMPLES,
                       confidence: float = 0.95, seed: int = BOOTSTRAP_SEED) -> Interval:
    """Percentile bootstrap interval of the mean over strata of each stratum's mean.

    Args:
        strata: one non-empty sequence of values per stratum (per seed: that seed's paired differences);
            pass ``[values]`` for a single sample.
        resamples: bootstrap resamples; each draws, in every stratum, as many values as it holds, with
            replacement.
        confidence: the central share of the bootstrap distribution the interval covers.
        seed: NumPy generator seed, so the same data always gives the same interval.
    Returns:
        the observed statistic and the (1-confidence)/2 and (1+confidence)/2 quantiles of its resamples.
    """
    arrays = [np.asarray(values, dtype=np.float64).reshape(-1) for values in strata]
    if not arrays or any(array.size == 0 for array in arrays):
        raise ValueError("bootstrap_interval needs at least one stratum and no empty stratum")
    if resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need resamples >= 1 and 0 < confidence < 1, got {resamples} and {confidence}")
    rng = np.random.default_rng(seed)
    statistic = np.zeros(resamples)
    for array in arrays:
        chunk = max(1, _CHUNK_ENTRIES // array.size)
        for start in range(0, resamples, chunk):
            count = min(chunk, resamples - start)
            picks = rng.integers(0, array.size, size=(count, array.size))
            statistic[start:start + count] += array[picks].mean(axis=1)
    statistic /= len(arrays)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(statistic, [tail, 1.0 - tail])
    observed = float(np.mean([array.mean() for array in arrays]))
    return Interval(observed, float(low), float(high), confidence)


def paired_differences(first: Mapping[int, Mapping[str, float]],
                       second: Mapping[int, Mapping[str, float]]) -> list[list[float]]:
    """Per seed, ``first[seed][id] - second[seed][id]`` for each case ID that both scored.

    Args:
        first, second: seed -> (case ID -> per-image score) of the two cells being compared.
    Returns:
        one list of differences per seed that both hold (ascending seed order, IDs sorted), skipping
        seeds whose test sets share no ID.
    """
    strata = []
    for seed in sorted(set(first) & set(second)):
        ids = sorted(set(first[seed]) & set(second[seed]))
        if ids:
            strata.append([first[seed][case] - second[seed][case] for case in ids])
    return strata
