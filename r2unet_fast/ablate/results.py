"""``results.csv``: one row per finished cell (and seed), gathered from the cells' run folders.

Columns: the cell (name, group, model, block, attention, loss, seed), its cost (parameters,
epochs, training seconds, images/s, peak memory), the six metrics of ``metrics.json`` on
val and test (``val_*``, ``test_*``: the trainer's, at the training resolution), and the
six of the per-image test scoring (``eval_test_*``: at the original resolution for file
datasets, as ``python -m r2unet_fast.evaluate`` scores).
"""
from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any

from ..files import atomic_write_text
from ..metrics import METRICS
from .cells import EVAL_FILE, PER_IMAGE_FILE, cell_status
from .grid import Cell

RESULTS_CSV = "results.csv"
CELL_COLUMNS: tuple[str, ...] = ("cell", "group", "model", "block", "attention", "loss", "seed")
COST_COLUMNS: tuple[str, ...] = ("parameters", "epochs_run", "best_epoch", "train_seconds", "images_per_s",
                                 "peak_memory_mb")
COLUMNS: tuple[str, ...] = (*CELL_COLUMNS, *COST_COLUMNS, *(f"val_{m}" for m in METRICS),
                            *(f"test_{m}" for m in METRICS), *(f"eval_test_{m}" for m in METRICS),
                            "eval_test_images", "eval_resolution")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _log_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def _column(rows: list[dict[str, str]], name: str) -> list[float]:
    """The non-empty values of ``name`` in log.csv rows (runs logged before a column existed leave it empty)."""
    return [float(row[name]) for row in rows if row.get(name) not in (None, "")]


def cost_of(log: list[dict[str, str]]) -> dict[str, float]:
    """Training cost from a run's log.csv rows: total seconds of the training loops, images/s (median over
    the epochs after the first, which warms up; the first when there is only one) and peak memory (max)."""
    seconds, rates, peaks = _column(log, "seconds"), _column(log, "images_per_s"), _column(log, "peak_memory_mb")
    steady = rates[1:] or rates
    return {"train_seconds": sum(seconds), "images_per_s": statistics.median(steady) if steady else float("nan"),
            "peak_memory_mb": max(peaks) if peaks else float("nan")}


def cell_row(cell: Cell, folder: Path) -> dict[str, Any]:
    """The results.csv row of a done cell."""
    metrics, summary = _read_json(folder / "metrics.json"), _read_json(folder / EVAL_FILE)
    row: dict[str, Any] = {"cell": cell.name, "group": cell.group, "model": cell.model, "block": cell.block,
                           "attention": "on" if cell.attention else "off", "loss": cell.loss, "seed": cell.seed,
                           "parameters": summary["parameters"], "epochs_run": metrics["epochs_run"],
                           "best_epoch": metrics["best_epoch"], **cost_of(_log_rows(folder / "log.csv"))}
    for part in ("val", "test"):
        row.update({f"{part}_{m}": metrics[part][m] for m in METRICS})
    row.update({f"eval_test_{m}": summary["metrics"][m] for m in METRICS})
    row.update(eval_test_images=summary["images"], eval_resolution=summary["resolution"])
    return row


def collect_rows(out: Path, cells: list[Cell]) -> list[dict[str, Any]]:
    """Rows of the cells of ``cells`` that are done, in grid order."""
    return [cell_row(cell, out / cell.name) for cell in cells if cell_status(out / cell.name) == "done"]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """results.csv: :data:`COLUMNS`, one row per done cell."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def per_image_jaccard(out: Path, cells: list[Cell]) -> dict[str, dict[int, dict[str, float]]]:
    """group -> seed -> case ID -> test Jaccard, from the done cells' per_image_test.csv."""
    scores: dict[str, dict[int, dict[str, float]]] = {}
    for cell in cells:
        folder = out / cell.name
        if cell_status(folder) != "done":
            continue
        with (folder / PER_IMAGE_FILE).open(newline="") as file:
            scores.setdefault(cell.group, {})[cell.seed] = {row["id"]: float(row["jaccard"])
                                                             for row in csv.DictReader(file)}
    return scores
