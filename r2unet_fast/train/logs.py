"""Run logging: log.csv, optional TensorBoard, console lines and progress bars (rank 0 only)."""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm

from ..files import atomic_write_text

# Leading columns of log.csv, in order; metric columns follow as val_<metric>, then the tail. New columns
# go at the end, so readers that index by position keep working; rows of older runs leave them empty.
BASE_COLUMNS: tuple[str, ...] = ("epoch", "train_loss", "val_loss")
TAIL_COLUMNS: tuple[str, ...] = ("lr", "seconds", "images_per_s", "peak_memory_mb", "data_wait_share")


def _tensorboard_writer(folder: Path) -> Any | None:
    """A SummaryWriter when torch.utils.tensorboard imports (it needs the tensorboard package), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder))


def _tensorboard_tag(column: str) -> str:
    """log.csv column -> TensorBoard tag: train_loss -> train/loss, val_dice -> val/dice, lr -> run/lr."""
    if column.startswith(("train_", "val_")):
        group, _, name = column.partition("_")
        return f"{group}/{name}"
    return f"run/{column}"


def progress(iterable: Iterable, total: int, description: str, enabled: bool) -> tqdm:
    """A tqdm bar on stderr, shown only when ``enabled`` and stderr is a terminal."""
    return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()), file=sys.stderr)


class RunLog:
    """Writes one row per epoch to ``log.csv`` (rewritten whole from the history, so after a resume it
    matches the checkpoint) and to TensorBoard under ``tensorboard/``; prints a line per epoch."""

    def __init__(self, folder: Path, enabled: bool) -> None:
        self.folder, self.enabled = folder, enabled
        self._writer = _tensorboard_writer(folder / "tensorboard") if enabled else None

    def say(self, message: str) -> None:
        """Print ``message`` on rank 0 (stdout, flushed so it interleaves sanely with bars)."""
        if self.enabled:
            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    def epoch(self, row: dict[str, float], history: list[dict[str, float]], epochs: int) -> None:
        """Record a finished epoch: ``row`` is its log entry, ``history`` all entries so far."""
        if not self.enabled:
            return
        self.write_csv(history)
        if self._writer is not None:
            for key, value in row.items():
                if key != "epoch":
                    self._writer.add_scalar(_tensorboard_tag(key), value, int(row["epoch"]))
            self._writer.flush()
        self.say(f"epoch {int(row['epoch'])}/{epochs}  loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}"
                 f"  val jaccard {row['val_jaccard']:.4f}  dice {row['val_dice']:.4f}  lr {row['lr']:.2e}"
                 f"  {row['seconds']:.1f}s  {row['images_per_s']:.1f} img/s"
                 + (f"  data wait {row['data_wait_share']:.0%}" if "data_wait_share" in row else ""))

    def write_csv(self, history: list[dict[str, float]]) -> None:
        """Rewrite log.csv from ``history`` atomically."""
        if not history:
            return
        middle = [k for k in history[0] if k not in BASE_COLUMNS + TAIL_COLUMNS]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[*BASE_COLUMNS, *middle, *TAIL_COLUMNS], lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        atomic_write_text(self.folder / "log.csv", buffer.getvalue())

    def write_json(self, name: str, value: Any) -> None:
        """Atomically write ``value`` as indented JSON to ``<run>/<name>``."""
        if self.enabled:
            atomic_write_text(self.folder / name, json.dumps(value, indent=2) + "\n")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
