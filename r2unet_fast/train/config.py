"""The training configuration: one dataclass, presets, config files, validation.

Precedence, lowest first: the dataclass defaults, the preset, the ``--config`` file,
then command-line flags. The resolved config is saved in every checkpoint and as
``config.json`` in the run folder, so a checkpoint alone rebuilds its model.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from ..data import DATASETS
from ..losses import LOSSES
from ..nn import BLOCKS
from ..ops.dispatch import BACKEND_CHOICES, ensure_available

PRESETS: tuple[str, ...] = ("cpu-demo", "ph2-cpu", "r2attunet-64", "paper")
AMP_MODES: tuple[str, ...] = ("off", "bf16", "fp16")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adam")
MAX_SEED = 2**32 - 1  # np.random.seed's limit; the seed also feeds torch and the split shuffles
# Fields that may change when a run is resumed; the rest define the run and must not. ``compile`` is here
# because torch.compile changes how the same maths runs, not what the run computes.
RESUMABLE: frozenset[str] = frozenset({"epochs", "patience", "workers", "device", "backend", "out", "preview",
                                       "compile"})
# Fields that may name a new place for the same thing on resume: the trainer checks --data against the
# fingerprint of the cases the run stored, so a moved or copied data set is accepted and another one is not.
RELOCATABLE: frozenset[str] = frozenset({"data"})


class UsageError(ValueError):
    """A bad command-line value, config file or checkpoint; ``str()`` is one line for ``error: ...``."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass
class TrainConfig:
    """Everything that defines a training run (defaults: the ``cpu-demo`` preset)."""

    preset: str = "cpu-demo"
    # data
    dataset: str = "synthetic"
    data: str | None = None
    split: str = "default"
    image_size: int = 64
    augment: bool = True
    synthetic_sizes: tuple[int, int, int] = (240, 40, 80)
    cache_dir: str | None = None
    # model (R2AttUNet arguments)
    base_channels: int = 16
    depth: int = 4
    t: int = 2
    block: str = "r2"
    attention: bool = True
    tied: bool = False
    shared_norm: bool = False
    attention_norm: bool = False
    backend: str = "auto"
    # optimisation
    epochs: int = 10
    batch_size: int = 8
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.02
    grad_clip: float = 1.0
    loss: str = "hybrid"
    dice_weight: float = 0.5
    pos_weight: float | str = 1.0
    amp: str = "off"
    patience: int = 0
    # runtime
    device: str = "auto"
    seed: int = 0
    workers: int | None = None
    out: str | None = None
    preview: int = 4
    compile: bool = False
    sync_bn: bool = False

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`r2unet_fast.nn.R2AttUNet` for this run."""
        return dict(in_channels=3, out_channels=1, base_channels=self.base_channels, depth=self.depth, t=self.t,
                    block=self.block, attention=self.attention, tied=self.tied, shared_norm=self.shared_norm,
                    attention_norm=self.attention_norm, backend=self.backend)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Defaults updated with ``values`` (validated names and types)."""
        return apply_values(cls(), values, source)


_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _coerce(name: str, value: Any, source: str) -> Any:
    """``value`` converted to the declared type of field ``name``; UsageError when it does not fit."""
    default = getattr(TrainConfig(), name)
    kind = _FIELDS[name].type
    try:
        if name == "pos_weight":
            return parse_pos_weight(value)
        if value is None and "None" in kind:
            return None
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if name == "synthetic_sizes":
            sizes = tuple(int(v) for v in value)
            if len(sizes) != 3:
                raise TypeError
            return sizes
        if kind.startswith("int"):
            if isinstance(value, bool) or int(value) != value:
                raise TypeError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind.startswith("str"):
            if not isinstance(value, (str, Path)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        pass
    raise UsageError(f"{source}: {name} must be {kind.replace(' | ', ' or ')}, got {value!r}")


def parse_pos_weight(value: Any) -> float | str:
    """``"auto"`` or a finite number >= 0; ValueError otherwise."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"pos weight must be 'auto' or a number >= 0, got {value!r}")
    return number


def apply_values(config: TrainConfig, values: dict[str, Any], source: str) -> TrainConfig:
    """A copy of ``config`` with ``values`` applied; unknown keys are a UsageError with a suggestion."""
    changes = {}
    for name, value in values.items():
        if name not in _FIELDS:
            close = difflib.get_close_matches(name, list(_FIELDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"{source}: unknown setting {name!r}{hint}")
        changes[name] = _coerce(name, value, source)
    return dataclasses.replace(config, **changes)


def _parse_settings(text: str, source: Path) -> dict[str, Any]:
    """A flat table of settings from JSON (or TOML for a .toml name); keys starting with "_" are comments."""
    try:
        values = tomllib.loads(text) if source.suffix.lower() == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        kind = "TOML" if source.suffix.lower() == ".toml" else "JSON"
        raise UsageError(f"config file {source} is not valid {kind}: {error}") from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {source} must hold one object of settings, got {type(values).__name__}")
    return {key: value for key, value in values.items() if not key.startswith("_")}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a JSON or TOML file (a flat table of TrainConfig fields)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist; check the --config path") from None
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not a text file (a JSON or TOML file in UTF-8 is expected); "
                         "check the --config path") from None
    except OSError as error:
        raise UsageError(f"cannot read config file {path}: {error.strerror or error}") from None
    return _parse_settings(text, path)


def preset_values(name: str) -> dict[str, Any]:
    """The settings of preset ``name`` (``r2unet_fast/train/configs/<name>.json``)."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return _parse_settings(resources.files(__package__).joinpath("configs", f"{name}.json").read_text(),
                           Path(f"{name}.json"))


def resolve_config(file_values: dict[str, Any] | None, cli_values: dict[str, Any],
                   file_name: str = "config file") -> TrainConfig:
    """Defaults < preset < config file < CLI flags, then validated."""
    file_values = dict(file_values or {})
    preset = cli_values.get("preset", file_values.get("preset", TrainConfig.preset))
    config = apply_values(TrainConfig(), {**preset_values(preset), "preset": preset}, f"preset {preset}")
    config = apply_values(config, file_values, file_name)
    config = apply_values(config, cli_values, "command line")
    return validate(config)


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{flag} {value!r} is not one of {', '.join(choices)}")


def _positive(flag: str, value: float, minimum: float = 1) -> None:
    if not (value >= minimum and math.isfinite(value)):  # inf passes ">=", NaN fails it; both are refused
        raise UsageError(f"{flag} must be a finite number >= {minimum:g}, got {value}")


def nearest_valid_size(size: int, multiple: int) -> int:
    """The multiple of ``multiple`` closest to ``size`` (at least ``multiple``)."""
    return max(multiple, round(size / multiple) * multiple)


def validate(config: TrainConfig) -> TrainConfig:
    """Check values that argparse cannot; UsageError naming the flag and the fix."""
    _choice("--dataset", config.dataset, DATASETS)
    _choice("--block", config.block, BLOCKS)
    _choice("--loss", config.loss, tuple(LOSSES))
    _choice("--amp", config.amp, AMP_MODES)
    _choice("--optimizer", config.optimizer, OPTIMIZERS)
    _choice("--backend", config.backend, BACKEND_CHOICES)
    for flag, value, low in (("--epochs", config.epochs, 1), ("--batch-size", config.batch_size, 1),
                             ("--image-size", config.image_size, 1), ("--base-channels", config.base_channels, 1),
                             ("--depth", config.depth, 2), ("--t", config.t, 0), ("--patience", config.patience, 0),
                             ("--preview", config.preview, 0), ("--lr", config.lr, 1e-12),
                             ("--weight-decay", config.weight_decay, 0), ("--warmup-epochs", config.warmup_epochs, 0),
                             ("--grad-clip", config.grad_clip, 0)):
        _positive(flag, value, low)
    if not 0.0 <= config.dice_weight <= 1.0:
        raise UsageError(f"--dice-weight must be in [0, 1], got {config.dice_weight}")
    if not 0.0 <= config.min_lr_ratio <= 1.0:  # above 1 the "cosine decay" would climb past --lr
        raise UsageError(f"--min-lr-ratio must be in [0, 1] (the final LR as a fraction of --lr), "
                         f"got {config.min_lr_ratio}")
    if not 0 <= config.seed <= MAX_SEED:  # NumPy's seeding refuses anything else, mid-start-up
        raise UsageError(f"--seed must be in [0, {MAX_SEED}], got {config.seed}")
    if config.workers is not None:
        _positive("--workers", config.workers, 0)
    if min(config.synthetic_sizes) < 1:
        raise UsageError(f"synthetic_sizes must be three positive counts, got {list(config.synthetic_sizes)}")
    multiple = 2 ** (config.depth - 1)
    if config.image_size % multiple:
        raise UsageError(
            f"--image-size {config.image_size} is not divisible by {multiple} (depth {config.depth} halves it "
            f"{config.depth - 1} times); nearest valid size is {nearest_valid_size(config.image_size, multiple)}")
    if config.split == "all":
        raise UsageError("--split all has no validation part to train against; use it with "
                         "python -m r2unet_fast.evaluate, and train with --split default")
    try:
        ensure_available(config.backend)
    except ValueError as error:
        raise UsageError(f"--backend: {error}") from None
    return config


def check_resume_overrides(saved: TrainConfig, requested: dict[str, Any]) -> TrainConfig:
    """The saved config with the resumable overrides applied; other changes are a UsageError."""
    changeable = RESUMABLE | RELOCATABLE
    for name, value in requested.items():
        if name in changeable or name == "preset":
            continue
        if _coerce(name, value, "command line") != getattr(saved, name):
            raise UsageError(
                f"--{name.replace('_', '-')} cannot change on --resume (the run used {getattr(saved, name)!r}); "
                f"only {', '.join(sorted('--' + n for n in RESUMABLE))} can (and --data, to the same data "
                f"elsewhere); start a new run to change it")
    return validate(apply_values(saved, {k: v for k, v in requested.items() if k in changeable}, "command line"))
