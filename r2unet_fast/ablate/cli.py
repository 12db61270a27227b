"""``python -m r2unet_fast.ablate``: train and evaluate a grid of blocks x attention x losses x seeds.

Every cell is a normal trainer run in ``<out>/<cell>/``, run in this process one after another,
with the trainer's flags (the same parser) and the grid's block, attention, loss and seed. A
rerun of the same command skips finished cells and resumes a half-finished one. After each
cell the ablation rewrites ``results.csv``, ``results.md`` and ``ablation.png`` from the
cells that are done. See docs/ablation.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from ..data.stored_split import absolute_root
from ..files import atomic_write_text
from ..train.cli import ArgumentParser, add_train_arguments, run_cli, sigterm_as_interrupt
from ..train.config import PRESETS, TrainConfig, UsageError, read_config_file, resolve_config
from ..train.distributed import launched_by_torchrun
from ..train.loaders import DATA_ENV, FILE_DATASETS, data_root
from ..train.outputs import RunLock, check_output_folder
from ..train.trainer import TrainingDiverged
from .cells import cell_config, run_cell
from .grid import ABLATION_PRESETS, AblationPreset, Grid, attention_list, block_list, checkout_relative, \
    load_preset, loss_list, preset_grid, seed_count
from .plot import ABLATION_PNG, plot_ablation
from .report import render
from .results import RESULTS_CSV, collect_rows, per_image_jaccard, write_csv

PROG = "python -m r2unet_fast.ablate"
RECORD_FILE = "ablation.json"
_GRID_DESTS = {"blocks": "blocks", "attention_grid": "attention", "losses": "losses", "seeds": "seeds"}


def build_parser() -> ArgumentParser:
    """The ablation's flags, then the trainer's own (less those a cell sets: --block, --no-attention,
    --loss, --resume, --out)."""
    parser = ArgumentParser(
        prog=PROG, argument_default=argparse.SUPPRESS,
        description="Train and evaluate every cell of a grid of blocks x attention x losses x seeds, with identical "
                    "data, split, schedule and seeds, and compare them (results.csv, results.md, ablation.png).",
        epilog="Precedence: trainer preset < ablation preset < --config file < flags. Rerun the same command "
               "to resume an interrupted ablation.")
    grid = parser.add_argument_group("ablation")
    grid.add_argument("--out", metavar="DIR",
                      help="the ablation's folder: one run folder per cell, and the results (required)")
    grid.add_argument("--blocks", type=block_list, metavar="LIST",
                      help="comma-separated blocks: conv, residual, recurrent, r2 (default all four)")
    grid.add_argument("--attention", dest="attention_grid", type=attention_list, metavar="LIST",
                      help="attention gates: off, on or off,on (default off,on)")
    grid.add_argument("--losses", type=loss_list, metavar="LIST",
                      help="comma-separated losses: hybrid, bce, dice (default all three)")
    grid.add_argument("--seeds", type=seed_count, metavar="N",
                      help="repeat every cell with seeds --seed, --seed+1, ... (default 1)")
    add_train_arguments(parser, presets=ABLATION_PRESETS + PRESETS, run_flags=False,
                        preset_help="ablation preset (cpu-small, isic2017-gpu: grid and settings) or trainer "
                                    "preset (settings only)")
    return parser


def _data_fallback(config: TrainConfig, preset: AblationPreset | None) -> TrainConfig:
    """The preset's fallback folder as ``data`` when neither --data nor the dataset's variable names one."""
    if (preset is None or preset.data_fallback is None or config.dataset not in FILE_DATASETS
            or config.data is not None or os.environ.get(DATA_ENV.get(config.dataset, ""))):
        return config
    fallback = checkout_relative(preset.data_fallback)
    if not fallback.is_dir():
        env = f" (or set ${DATA_ENV[config.dataset]})" if config.dataset in DATA_ENV else ""
        raise UsageError(f"--dataset {config.dataset} needs --data PATH{env}; the {preset.name} preset also "
                         f"looked in {fallback}, which does not exist")
    return dataclasses.replace(config, data=str(fallback))


def configure(args: dict[str, Any]) -> tuple[TrainConfig, Grid, Path | None]:
    """(the settings every cell shares, the grid, the ablation folder if given) from the parsed flags."""
    out = Path(args.pop("out")).expanduser() if "out" in args else None
    grid_flags = {key: args.pop(dest) for dest, key in _GRID_DESTS.items() if dest in args}
    preset = load_preset(args.pop("preset")) if args.get("preset") in ABLATION_PRESETS else None
    config_file = args.pop("config_file", None)
    file_values = read_config_file(config_file) if config_file else {}
    layered = {**(preset.train if preset else {}), **file_values}
    source = " and ".join(part for part in (preset and f"ablation preset {preset.name}",
                                            config_file and f"config file {config_file}") if part) or "config"
    config = _data_fallback(resolve_config(layered, args, source), preset)
    root = data_root(config.dataset, config.data)  # --data, else the environment; UsageError when neither
    config = dataclasses.replace(config, data=None if root is None else absolute_root(root), out=None)
    return config, preset_grid(preset, grid_flags, config.seed), out


def _record(out: Path, argv: Sequence[str], config: TrainConfig, grid: Grid) -> None:
    """ablation.json: this invocation's command, shared settings and grid (rewritten by every invocation)."""
    record = {"command": f"{PROG} {shlex.join(argv)}".strip(), "config": config.to_dict(),
              "grid": {"blocks": list(grid.blocks), "attention": ["on" if a else "off" for a in grid.attention],
                       "losses": list(grid.losses), "seeds": list(grid.seeds)},
              "cells": [cell.name for cell in grid.cells()]}
    atomic_write_text(out / RECORD_FILE, json.dumps(record, indent=2) + "\n")


def write_outputs(out: Path, grid: Grid, config: TrainConfig) -> None:
    """results.csv, results.md and ablation.png from the cells of ``grid`` that are done."""
    cells = grid.cells()
    rows = collect_rows(out, cells)
    write_csv(out / RESULTS_CSV, rows)
    atomic_write_text(out / "results.md", render(grid, config, rows, per_image_jaccard(out, cells)))
    plot_ablation([cell for cell in cells if cell.seed == grid.seeds[0]], rows, out / ABLATION_PNG)


def _say(message: str) -> None:
    print(message, flush=True)


def _ablate(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = vars(build_parser().parse_args(argv))
    print_only = args.pop("print_config", False)
    config, grid, out = configure(args)
    cells = grid.cells()
    # every cell is checked before any trains
    configs = {cell: cell_config(config, cell, None if out is None else out / cell.name) for cell in cells}
    if print_only:
        print(json.dumps({"config": config.to_dict(), "cells": [cell.name for cell in cells]}, indent=2))
        return 0
    if out is None:
        raise UsageError("the ablation needs --out DIR: the folder of its cells and results (rerun with the same "
                         "--out to resume it)")
    if launched_by_torchrun():
        # Each cell would set up and tear down the process group in turn; not supported (yet).
        raise UsageError("the ablation runs its cells one after another in one process; run it without torchrun "
                         "(--device picks the GPU)")
    check_output_folder(out, "--out")
    diverged: list[str] = []
    with RunLock.acquire(out):  # one ablation per folder: two would train the same cells at once
        _record(out, argv, config, grid)
        for index, cell in enumerate(cells, 1):
            _say(f"ablation cell {index}/{len(cells)}: {cell.name} ({cell.model}, {cell.loss} loss, seed {cell.seed})")
            try:
                status, code = run_cell(configs[cell], out / cell.name, _say)
            except TrainingDiverged as error:
                # One unstable cell must not strand the rest of a long grid; a rerun retries it from its
                # last good checkpoint.
                _say(f"ablation cell {cell.name} diverged, going on with the others: {error}")
                diverged.append(cell.name)
                continue
            if status == "done":
                _say(f"ablation cell {cell.name}: already done, skipped")
                continue
            write_outputs(out, grid, config)
            if code != 0:
                _say(f"ablation stopped in cell {cell.name}; rerun the same command to resume it: "
                     f"{PROG} {shlex.join(argv)}")
                return code
        write_outputs(out, grid, config)
    if diverged:
        raise TrainingDiverged(f"{len(diverged)} of {len(cells)} cells diverged ({', '.join(diverged)}; see their "
                               f"lines above); the results in {out} leave them out; rerun the command to retry them, "
                               "or start a new --out with a lower --lr or --grad-clip")
    _say(f"ablation done: {len(cells)} cells; results in {out / RESULTS_CSV}, {out / 'results.md'}, "
         f"{out / ABLATION_PNG}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m r2unet_fast.ablate``; returns the exit code."""
    with sigterm_as_interrupt():
        return run_cli(_ablate, argv)
