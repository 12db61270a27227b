"""Seeded train/val/test partition shared by the PH2 and folder datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Sample
from .errors import DataError

SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")
SEEDED_FRACTIONS: tuple[float, float, float] = (0.7, 0.1, 0.2)


def seeded_split(samples: list[Sample], seed: int, source: Path) -> dict[str, list[Sample]]:
    """Sort by id, permute with ``seed`` and cut 70% / 10% / 20% (rounded, each part non-empty).

    ``source`` only names the data in the error raised for fewer than 3 samples.
    """
    if len(samples) < 3:
        raise DataError(
            f"{source} has {len(samples)} sample(s); a train/val/test split needs at least 3 "
            "(add more or use split='all')"
        )
    ordered = sorted(samples, key=lambda sample: sample.id)
    order = np.random.default_rng(seed).permutation(len(ordered))
    n_val = max(1, round(SEEDED_FRACTIONS[1] * len(ordered)))
    n_test = max(1, round(SEEDED_FRACTIONS[2] * len(ordered)))
    n_train = len(ordered) - n_val - n_test
    bounds = (0, n_train, n_train + n_val, len(ordered))
    return {
        name: [ordered[i] for i in order[start:stop]]
        for name, start, stop in zip(SPLIT_NAMES, bounds[:-1], bounds[1:])
    }
