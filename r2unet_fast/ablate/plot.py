"""``ablation.png``: test Dice and Jaccard per cell, mean over seeds with ± sample std error bars."""
from __future__ import annotations

import io
import statistics
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ..files import atomic_write
from .grid import Cell

ABLATION_PNG = "ablation.png"


def plot_ablation(groups: list[Cell], rows: list[dict[str, Any]], path: Path) -> None:
    """Plot ``eval_test_dice`` and ``eval_test_jaccard`` (results.csv rows) for each cell group in
    ``groups`` order; groups without a done cell keep their place on the axis, empty."""
    figure = Figure(figsize=(max(6.0, 0.75 * len(groups) + 2.0), 4.5))
    axis = figure.subplots()
    positions = range(len(groups))
    for offset, (metric, label, marker) in zip((-0.12, 0.12), (("dice", "Dice", "o"), ("jaccard", "Jaccard", "s"))):
        xs, means, errors = [], [], []
        for x, cell in zip(positions, groups):
            values = [float(row[f"eval_test_{metric}"]) for row in rows if row["group"] == cell.group]
            if values:
                xs.append(x + offset)
                means.append(statistics.fmean(values))
                errors.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        axis.errorbar(xs, means, yerr=errors, fmt=marker, capsize=4, label=label)
    axis.set_xticks(list(positions), [cell.group for cell in groups], rotation=45, ha="right")
    axis.set_xlim(-0.6, len(groups) - 0.4)
    axis.set_ylabel("test score (mean ± std over seeds)")
    axis.grid(axis="y", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    # A bare Figure renders with Agg and leaves pyplot's global backend alone, as train/plots.py does.
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write(path, lambda file: file.write(buffer.getvalue()))
