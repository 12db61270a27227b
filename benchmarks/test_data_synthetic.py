"""Rendering one synthetic lesion (128x128): the default run's data cost per image.

The Quick start trains on these images, rendered on the fly by the loader
workers, so rendering must stay below the training step's cost per image
(about 10 ms per image on one core of the 2-core development VM).
"""
from __future__ import annotations

from r2unet_fast.data import SyntheticLesions


def test_synthetic_render(benchmark) -> None:
    benchmark.group = "data synthetic render 128x128"
    lesions = SyntheticLesions(50, 128, seed=0)
    indices = iter(range(10**9))
    benchmark(lambda: lesions.render(next(indices) % 50))
