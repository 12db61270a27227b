"""``results.md``: mean ± std over seeds per cell (best per column in bold, the paper's metric order AC, SE,
SP, DC, JS), and the two claims as paired per-image differences in test Jaccard with bootstrap intervals."""
from __future__ import annotations

import statistics
from typing import Any, Sequence

from ..train.config import TrainConfig
from .grid import Cell, Grid
from .stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, bootstrap_interval, paired_differences

# (heading, metric) in the order of Alom et al.'s tables.
PAPER_METRICS: tuple[tuple[str, str], ...] = (("AC", "accuracy"), ("SE", "sensitivity"), ("SP", "specificity"),
                                              ("DC", "dice"), ("JS", "jaccard"))
# Cost columns: (heading, results.csv column, digits, whether higher is better).
COST: tuple[tuple[str, str, int, bool], ...] = (("train s", "train_seconds", 0, False),
                                               ("img/s", "images_per_s", 1, True),
                                               ("peak MiB", "peak_memory_mb", 0, False))
MISSING = "—"


def _spread(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _text(mean: float, std: float | None, digits: int) -> str:
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _bold_best(columns: list[list[tuple[float, str] | None]], higher: Sequence[bool],
               digits: Sequence[int]) -> list[list[str]]:
    """Cell texts per column with the best value(s) in bold. Best is judged on the printed digits, so two
    values that print alike are both bold or neither."""
    out = []
    for entries, up, places in zip(columns, higher, digits):
        shown = [None if entry is None else round(entry[0], places) for entry in entries]
        best = (max if up else min)((value for value in shown if value is not None), default=None)
        out.append([MISSING if entry is None else (f"**{entry[1]}**" if value == best else entry[1])
                    for entry, value in zip(entries, shown)])
    return out


def _parameters(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 100_000 else f"{count / 1e3:.1f}k"


def _table(
header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def _cell_table(groups: list[Cell], rows: dict[str, list[dict[str, Any]]], prefix: str,
                with_cost: bool) -> list[str]:
    """One row per cell group: model, cell, seeds done, then the metrics (4 digits) and the cost."""
    columns: list[list[tuple[float, str] | None]] = []
    higher: list[bool] = []
    places: list[int] = []
    specs = [(f"{prefix}{metric}", 4, True) for _, metric in PAPER_METRICS]
    if with_cost:
        specs += [(column, digits, up) for _, column, digits, up in COST]
    for column, digits, up in specs:
        entries: list[tuple[float, str] | None] = []
        for cell in groups:
            values = [float(row[column]) for row in rows.get(cell.group, [])]
            if values:
                mean, std = _spread(values)
                entries.append((mean, _text(mean, std, digits)))
            else:
                entries.append(None)
        columns.append(entries)
        higher.append(up)
        places.append(digits)
    texts = _bold_best(columns, higher, places)
    header = ["model", "cell", "seeds", *(heading for heading, _ in PAPER_METRICS)]
    if with_cost:
        header += [heading for heading, *_ in COST] + ["params"]
    body = []
    for index, cell in enumerate(groups):
        done = rows.get(cell.group, [])
        row = [cell.model, f"`{cell.group}`", str(len(done)) if done else "not finished",
               *(column[index] for column in texts)]
        if with_cost:
            row.append(_parameters(int(done[0]["parameters"])) if done else MISSING)
        body.append(row)
    return _table(header, body)


def _claim_pairs(grid: Grid) -> list[tuple[str, list[tuple[Cell, Cell, str]] | str]]:
    """For each claim: (title, [(better-candidate cell, baseline cell, what they share)]) or (title, why
    the grid cannot test it)."""
    seed = grid.seeds[0]
    claims: list[tuple[str, list[tuple[Cell, Cell, str]] | str]] = []
    title = "Attention gates: on − off"
    if set(grid.attention) == {False, True}:
        claims.append((title, [(Cell(b, True, loss, seed), Cell(b, False, loss, seed), f"{b}, {loss} loss")
                               for b in grid.blocks for loss in grid.losses]))
    else:
        have = "on" if grid.attention[0] else "off"
        claims.append((title, f"not in this grid: it has attention {have} only (add --attention off,on)"))
    title = "Loss: hybrid − BCE"
    if {"hybrid", "bce"} <= set(grid.losses):
        claims.append((title, [(Cell(b, a, "hybrid", seed), Cell(b, a, "bce", seed),
                                f"{b}, attention {'on' if a else 'off'}")
                               for b in grid.blocks for a in grid.attention]))
    else:
        claims.append((title, f"not in this grid: its losses are {', '.join(grid.losses)} "
                              "(add --losses hybrid,bce)"))
    return claims


def _claims(grid: Grid, jaccard: dict[str, dict[int, dict[str, float]]]) -> list[str]:
    lines = ["## The two claims: paired per-image differences in test Jaccard", "",
             f"Each row compares two cells that differ in one setting only, on the same test images: per test "
             f"image (paired by case ID within a seed), the first cell's Jaccard minus the second's. \"mean Δ\" "
             f"is the mean over images (over seeds: the mean of each seed's mean); the interval is a 95% "
             f"percentile bootstrap over the images, {BOOTSTRAP_RESAMPLES} resamples, generator seed "
             f"{BOOTSTRAP_SEED}, resampled within each seed. An interval above 0 favours the first cell.", ""]
    for title, pairs in _claim_pairs(grid):
        lines += [f"### {title}", ""]
        if isinstance(pairs, str):
            lines += [pairs[0].upper() + pairs[1:] + ".", ""]
            continue
        body = []
        for first, second, shared in pairs:
            label = [f"`{first.group}` − `{second.group}`", shared]
            missing = [c.group for c in (first, second) if c.group not in jaccard]
            strata = [] if missing else paired_differences(jaccard[first.group], jaccard[second.group])
            if missing or not strata:
                why = f"not finished: {', '.join(missing)}" if missing else "no test image in common"
                body.append(label + [MISSING, MISSING, why, MISSING])
                continue
            interval = bootstrap_interval(strata)
            verdict = "yes" if not interval.contains(0.0) else "no"
            body.append(label + [f"{sum(map(len, strata))} ({len(strata)})", f"{interval.mean:+.4f}",
                                 f"[{interval.low:+.4f}, {interval.high:+.4f}]", verdict])
        lines += _table(["cells", "shared", "images (seeds)", "mean Δ JS", "95% interval", "excludes 0"], body)
        lines.append("")
    return lines


def _settings(config: TrainConfig) -> str:
    epochs = f"{config.epochs} epoch{'' if config.epochs == 1 else 's'}"
    return (f"{config.image_size} px, base {config.base_channels}, depth {config.depth}, t={config.t}, {epochs}, "
            f"batch {config.batch_size}, {config.optimizer} lr {config.lr:g}, amp {config.amp}")


def render(grid: Grid, base: TrainConfig, rows: list[dict[str, Any]],
           jaccard: dict[str, dict[int, dict[str, float]]]) -> str:
    """The text of results.md for ``rows`` (results.csv rows of the done cells) and per-image Jaccard
    (group -> seed -> case ID -> score)."""
    groups = [cell for cell in grid.cells() if cell.seed == grid.seeds[0]]
    by_group: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row)
    resolution = rows[0]["eval_resolution"] if rows else "original"
    where = "each image at its original size" if resolution == "original" else f"the {resolution.split()[-1]} images"
    data = base.dataset + (f" ({base.data}, split {base.split})" if base.data else "")
    lines = ["# Ablation results", "",
             f"Data: {data}. Every cell: {_settings(base)}. Seeds: {', '.join(map(str, grid.seeds))}. "
             f"Cells done: {len(rows)} of {len(grid.cells())}.", "",
             "## Test set", "",
             f"Metrics per test image at threshold 0.5 ({where}, as `python -m r2unet_fast.evaluate` scores), "
             "averaged over images; each cell: mean ± sample std over its seeds. Best per column in bold. "
             "AC accuracy, SE sensitivity, SP specificity, DC Dice, JS Jaccard. \"train s\" is the time in the "
             "training loops, summed over epochs; img/s the median over epochs after the first.", ""]
    lines += _cell_table(groups, by_group, "eval_test_", with_cost=True)
    lines += ["", "## Validation set", "",
              "The best epoch's validation metrics (the trainer's `metrics.json`, at the training size).", ""]
    lines += _cell_table(groups, by_group, "val_", with_cost=False)
    lines += [""] + _claims(grid, jaccard)
    return "\n".join(lines).rstrip() + "\n"
