"""The paper's comparison as one command: ``python -m r2unet_fast.ablate`` trains and evaluates a grid of
blocks (U-Net, ResU-Net, RU-Net, R2U-Net) x attention gates off/on x losses x seeds, one trainer run per
cell, and writes results.csv, results.md (with paired bootstrap intervals) and ablation.png.

See docs/ablation.md.
"""
from .cli import main
from .grid import ABLATION_PRESETS, Cell, Grid
from .stats import Interval, bootstrap_interval, paired_differences

__all__ = ["ABLATION_PRESETS", "Cell", "Grid", "Interval", "bootstrap_interval", "main", "paired_differences"]
