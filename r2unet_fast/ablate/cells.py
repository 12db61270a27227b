"""One cell of the ablation: a normal trainer run in ``<out>/<cell>/``, started, resumed or skipped, then
its test set scored per image.

A cell's folder says how far it got, and the next invocation carries on from there:

- ``new``: no ``checkpoints/last.pt`` -> train from scratch (``train(config)``);
- ``partial``: ``last.pt`` but no ``metrics.json`` -> continue it as ``--resume`` would;
- ``trained``: ``metrics.json`` (training finished) but no ``per_image_test.csv`` -> score only;
- ``done``: ``per_image_test.csv`` (written last) -> skipped.

An existing cell must have been trained with the settings the ablation asks for now; only
runtime settings (:data:`RUNTIME_FIELDS`) may differ, so every cell of a grid shares data,
split, schedule and seed whatever was interrupted in between.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from ..data.stored_split import SPLIT_FILE, absolute_root
from ..evaluate import score, write_per_image
from ..files import atomic_write_text
from ..train.checkpoint import CHECKPOINT_DIR, config_of, load_checkpoint
from ..train.cli import train
from ..train.config import RELOCATABLE, RESUMABLE, TrainConfig, UsageError, check_resume_overrides, validate
from ..train.inference import load_model
from ..train.loaders import FILE_DATASETS, run_splits
from ..train.runtime import check_amp, default_workers, resolve_device
from .grid import Cell

PER_IMAGE_FILE = "per_image_test.csv"
EVAL_FILE = "eval_test.json"
# Settings that may differ between the invocations that built one cell: where and how it runs, not what it
# computes. Unlike the trainer's --resume, epochs and patience are not among them: they are the schedule,
# which every cell of a grid shares.
RUNTIME_FIELDS: frozenset[str] = frozenset(
    (RESUMABLE | RELOCATABLE | {"preset", "cache_dir"}) - {"epochs", "patience"})
_RESUME_OVERRIDES = (RESUMABLE | RELOCATABLE) - {"epochs", "patience"}


def cell_config(base: TrainConfig, cell: Cell, folder: Path | None) -> TrainConfig:
    """``base`` with the cell's block, attention, loss and seed, writing into ``folder`` (validated)."""
    return validate(dataclasses.replace(base, block=cell.block, attention=cell.attention, loss=cell.loss,
                                        seed=cell.seed, out=None if folder is None else str(folder)))


def cell_status(folder: Path) -> str:
    """``"done"``, ``"trained"``, ``"partial"`` or ``"new"`` (see the module docstring)."""
    if (folder / PER_IMAGE_FILE).is_file() and (folder / "metrics.json").is_file():
        return "done"
    if (folder / "metrics.json").is_file():
        return "trained"
    if (folder / CHECKPOINT_DIR / "last.pt").is_file():
        return "partial"
    return "new"


def saved_config(folder: Path) -> TrainConfig:
    """The config a cell's run saved (``config.json``, written when its training started)."""
    path = folder / "config.json"
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"cannot read {path} ({error}); the cell {folder.name} is damaged: delete {folder} "
                         "to train it again") from None
    return TrainConfig.from_dict(values, source=str(path))


def check_cell_config(saved: TrainConfig, expected: TrainConfig, folder: Path) -> None:
    """UsageError naming the first setting, other than :data:`RUNTIME_FIELDS`, in which the run in
    ``folder`` differs from what the ablation asks for now."""
    have, want = saved.to_dict(), expected.to_dict()
    for name in want:
        if name not in RUNTIME_FIELDS and have[name] != want[name]:
            raise UsageError(
                f"{folder} was trained with {name} = {have[name]!r} and this ablation asks for {want[name]!r}; "
                "every cell of an ablation shares its settings: rerun with the ablation's original settings to "
                "resume it, or pick another --out")


def check_same_data(saved: TrainConfig, expected: TrainConfig, folder: Path) -> None:
    """For a finished cell whose data folder was given differently now: DataError unless it holds the
    cases of the cell's stored split (a moved copy of the same data is fine, another data set is not)."""
    if expected.dataset not in FILE_DATASETS or expected.data is None or absolute_root(expected.data) == saved.data:
        return
    split = json.loads((folder / SPLIT_FILE).read_text())
    run_splits(expected, split, checkpoint=str(folder))


def run_cell(expected: TrainConfig, folder: Path, say: Callable[[str], None]) -> tuple[str, int]:
    """Bring the cell in ``folder`` to ``done``: train, resume or skip it, then score its test set.

    Returns (the status it was found in, the exit code: 0, or 130 when training was interrupted)."""
    status = cell_status(folder)
    if status == "partial":
        state = load_checkpoint(folder)
        check_cell_config(config_of(state), expected, folder)
        overrides = {name: getattr(expected, name) for name in _RESUME_OVERRIDES}
        config = check_resume_overrides(config_of(state), {**overrides, "out": str(folder)})
        say(f"resuming after epoch {state['epoch']} of {config.epochs}")
        code = train(config, state)
    elif status == "new":
        code = train(dataclasses.replace(expected))  # a copy: the trainer rewrites config.data
    else:
        saved = saved_config(folder)
        check_cell_config(saved, expected, folder)
        if status == "done":
            check_same_data(saved, expected, folder)
        code = 0
    if code == 0 and status != "done":
        score_test(folder, expected)
    return status, code


def score_test(folder: Path, expected: TrainConfig) -> dict[str, Any]:
    """Score the cell's ``best.pt`` on its test cases as ``python -m r2unet_fast.evaluate --split test``
    does (each image at its original resolution; the generated size for synthetic data), with the run's
    autocast and batch size. Writes ``eval_test.json`` (summary), then ``per_image_test.csv`` (one row per
    case: id and each metric), which marks the cell done; returns the summary."""
    device = resolve_device(expected.device)
    check_amp(expected.amp, device)
    model, config, state = load_model(folder, device)
    config = dataclasses.replace(config, data=expected.data)  # the data may have moved (checked against the split)
    run_data = run_splits(config, state.get("split"), checkpoint=state["path"], augment=False)
    test = run_data.datasets["test"]
    workers = config.workers if config.workers is not None else default_workers(device, 1)
    accumulator = score(model, test, device, amp=config.amp, batch_size=config.batch_size, workers=workers)
    resolution = "original" if hasattr(test, "samples") else f"generated {config.image_size}x{config.image_size}"
    summary = {"checkpoint": state["path"], "epoch": state["epoch"], "images": accumulator.count,
               "resolution": resolution, "model_input_size": config.image_size, "amp": config.amp,
               "parameters": sum(p.numel() for p in model.parameters()), "metrics": accumulator.compute()}
    atomic_write_text(folder / EVAL_FILE, json.dumps(summary, indent=2) + "\n")
    write_per_image(folder / PER_IMAGE_FILE, accumulator.per_image())
    return summary
