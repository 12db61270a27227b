"""The ablation grid: cells (block x attention x loss x seed), their names, and the ablation presets.

A cell is one normal trainer run; its name is its folder under the ablation's ``--out``
(``r2-att-hybrid-s0``). Presets are JSON files in ``presets/``: a grid plus trainer settings
(a trainer preset name and :class:`~r2unet_fast.train.TrainConfig` fields), like the trainer's
``train/configs/``.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from importlib import resources
from itertools import product
from pathlib import Path
from typing import Any, Sequence

from ..losses import LOSSES
from ..nn import BLOCKS
from ..train.config import UsageError

ATTENTION_CHOICES: tuple[str, ...] = ("off", "on")
ABLATION_PRESETS: tuple[str, ...] = ("cpu-small", "isic2017-gpu")
# The paper's names of the four models; attention inserts "Att" before "U-Net" (R2U-Net -> R2AttU-Net).
MODEL_NAMES: dict[str, str] = {"conv": "U-Net", "residual": "ResU-Net", "recurrent": "RU-Net", "r2": "R2U-Net"}
_GRID_KEYS = ("blocks", "attention", "losses", "seeds")


@dataclass(frozen=True)
class Cell:
    """One model/loss combination of the grid, trained with one seed."""

    block: str
    attention: bool
    loss: str
    seed: int

    @property
    def name(self) -> str:
        """The cell's folder name, e.g. ``r2-att-hybrid-s0`` or ``conv-noatt-bce-s1``."""
        return f"{self.group}-s{self.seed}"

    @property
    def group(self) -> str:
        """The name without the seed: the cells that ``results.md`` averages over seeds."""
        return f"{self.block}-{'att' if self.attention else 'noatt'}-{self.loss}"

    @property
    def model(self) -> str:
        """The paper's name of the model, e.g. ``R2AttU-Net``."""
        name = MODEL_NAMES[self.block]
        return name.replace("U-Net", "AttU-Net") if self.attention else name


@dataclass(frozen=True)
class Grid:
    """The axes of an ablation, each in the order given (the order of results.csv and results.md)."""

    blocks: tuple[str, ...] = BLOCKS
    attention: tuple[bool, ...] = (False, True)
    losses: tuple[str, ...] = tuple(LOSSES)
    seeds: tuple[int, ...] = (0,)

    def cells(self) -> list[Cell]:
        """Every cell, seed by seed: a stopped ablation has whole grids of the first seeds done."""
        return [Cell(block, attention, loss, seed)
                for seed, block, attention, loss in product(self.seeds, self.blocks, self.attention, self.losses)]


def _choices(text: str, choices: Sequence[str], what: str) -> tuple[str, ...]:
    """``"a,b"`` -> ("a", "b"), each one of ``choices``, without repeats."""
    values = tuple(part.strip() for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}: {', '.join(choices)}")
    for value in values:
        if value not in choices:
            raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(choices)}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r} names a value twice")
    return values


def block_list(text: str) -> tuple[str, ...]:
    """argparse type of ``--blocks conv,r2``."""
    return _choices(text, BLOCKS, "blocks")


def attention_list(text: str) -> tuple[bool, ...]:
    """argparse type of ``--attention off,on`` -> (False, True)."""
    return tuple(value == "on" for value in _choices(text, ATTENTION_CHOICES, "attention settings"))


def loss_list(text: str) -> tuple[str, ...]:
    """argparse type of ``--losses hybrid,bce``."""
    return _choices(text, tuple(LOSSES), "losses")


def seed_count(text: str) -> int:
    """argparse type of ``--seeds N`` (N >= 1)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of seeds >= 1, got {text!r}")
    return value


@dataclass(frozen=True)
class AblationPreset:
    """An ablation preset: grid axes as the flags spell them (None: the default), trainer settings, and for
    file datasets a folder to use when neither ``--data`` nor the dataset's environment variable is set."""

    name: str
    grid: dict[str, Any]
    train: dict[str, Any]
    data_fallback: str | None


def load_preset(name: str) -> AblationPreset:
    """The preset ``presets/<name>.json``; UsageError for an unknown name."""
    if name not in ABLATION_PRESETS:
        raise UsageError(f"unknown ablation preset {name!r}; choose one of {', '.join(ABLATION_PRESETS)}")
    values = json.loads(resources.files(__package__).joinpath("presets", f"{name}.json").read_text())
    grid = {key: values[key] for key in _GRID_KEYS if key in values}
    return AblationPreset(name, grid, dict(values.get("train", {})), values.get("data_fallback"))


def preset_grid(preset: AblationPreset | None, flags: dict[str, Any], base_seed: int) -> Grid:
    """The grid: flags over the preset over the full default grid. ``flags`` holds the parsed
    ``blocks``/``attention``/``losses``/``seeds`` that were given; seeds run ``base_seed`` upwards."""
    parsers = {"blocks": block_list, "attention": attention_list, "losses": loss_list, "seeds": seed_count}
    values: dict[str, Any] = {}
    for key, parse in parsers.items():
        if key in flags:
            values[key] = flags[key]
        elif preset is not None and key in preset.grid:
            raw = preset.grid[key]
            try:  # a preset spells the axes as the flags do ("conv,r2"), or as a JSON list
                values[key] = parse(",".join(map(str, raw)) if isinstance(raw, list) else str(raw))
            except argparse.ArgumentTypeError as error:
                raise UsageError(f"ablation preset {preset.name}: {key}: {error}") from None
    seeds = values.pop("seeds", 1)
    return Grid(**values, seeds=tuple(range(base_seed, base_seed + seeds)))


def checkout_relative(path: str) -> Path:
    """``path`` relative to the folder holding the ``r2unet_fast`` package (a source checkout's root), as
    the tests find the shared PH2 cases (``../shared/data/ph2``)."""
    return Path(__file__).resolve().parents[2] / path
