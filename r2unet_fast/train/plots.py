"""curves.png (loss and metrics per epoch) and predictions.png (image, truth, prediction, attention)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..data import denormalize
from ..files import atomic_write


def _save(figure: Figure, path: Path) -> None:
    # A bare Figure renders with Agg and leaves pyplot's global backend alone (notebooks keep theirs).
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, lambda file: file.write(buffer.getvalue()))


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """Train/val loss and the val metrics against epoch."""
    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(11, 4))
    loss_axis, metric_axis = figure.subplots(1, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        loss_axis.plot(epochs, [row[key] for row in history], marker="o", markersize=3, label=label)
    # Log scale: early BatchNorm statistics can make the first validation losses huge.
    loss_axis.set(xlabel="epoch", ylabel="loss", title="Loss", yscale="log")
    loss_axis.legend()
    for key in ("val_jaccard", "val_dice", "val_sensitivity", "val_specificity", "val_accuracy"):
        metric_axis.plot(epochs, [row[key] for row in history], marker="o", markersize=3, label=key[4:])
    metric_axis.set(xlabel="epoch", ylabel="score", title="Validation metrics", ylim=(0, 1.02))
    metric_axis.legend(loc="lower right")
    for axis in (loss_axis, metric_axis):
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(figure, path)


def plot_predictions(images: torch.Tensor, masks: torch.Tensor, probs: torch.Tensor, attention: torch.Tensor | None,
                     ids: list[str], path: Path, threshold: float = 0.5) -> None:
    """One row per case: image, ground truth, prediction (and the finest attention map when given).

    Args:
        images: normalised (N, 3, S, S); masks, probs: (N, 1, S, S); attention: (N, 1, S, S) or None.
    """
    pictures = denormalize(images)
    columns = ["image", "ground truth", "prediction"] + (["attention (finest gate)"] if attention is not None else [])
    figure = Figure(figsize=(2.6 * len(columns), 2.6 * len(ids)))
    axes = figure.subplots(len(ids), len(columns), squeeze=False)
    for row, case in enumerate(ids):
        truth = masks[row, 0].numpy()
        predicted = (probs[row, 0] > threshold).numpy()
        panels = [pictures[row], truth, predicted]
        if attention is not None:
            panels.append(attention[row, 0].float().numpy())
        for column, panel in enumerate(panels):
            axis = axes[row, column]
            if column == 3:
                axis.imshow(pictures[row])
                axis.imshow(panel, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            else:
                axis.imshow(panel, cmap=None if column == 0 else "gray", vmin=0, vmax=1 if column else None)
            if column == 2:
                overlap = np.logical_and(truth > 0.5, predicted).sum()
                union = np.logical_or(truth > 0.5, predicted).sum()
                score = f"JS {overlap / union if union else 1.0:.2f}"
                axis.set_title(f"prediction, {score}" if row == 0 else score, fontsize=9 if row == 0 else 8)
            elif row == 0:
                axis.set_title(columns[column], fontsize=9)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row, 0].set_ylabel(case, fontsize=8)
    _save(figure, path)
