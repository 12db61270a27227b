"""Checkpoints that carry their config (written atomically), and RNG state capture.

A checkpoint is a plain dict loadable with ``torch.load(weights_only=True)``:
``model``, ``optimizer``, ``scheduler``, ``scaler`` (state dicts), ``epoch`` (epochs
completed), ``best`` (epoch, val metrics), ``stale_epochs``, ``pos_weight``, ``history``
(one dict per epoch, the rows of log.csv), ``rng`` and ``config`` (TrainConfig as a dict).
"""
from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_write
from .config import TrainConfig, UsageError

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng` (CUDA states only when the device count matches)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically write ``state`` (see module docstring) with the format version."""
    atomic_write(path, lambda file: torch.save({"format": FORMAT_VERSION, **state}, file))


def resolve_checkpoint(path: str | Path, name: str = "last.pt") -> Path:
    """A checkpoint file from a path to it or to a run folder (its ``checkpoints/<name>``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / CHECKPOINT_DIR / name, path / name):
            if candidate.is_file():
                return candidate
        raise UsageError(f"no checkpoint in {path}: expected {path / CHECKPOINT_DIR / name}; "
                         "pass a run folder or a .pt file")
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist; pass a run folder or a .pt file written by the trainer")
    return path


ZIP_MAGIC = b"PK\x03\x04"  # torch.save has written zip archives since torch 1.6


def _check_archive(path: Path) -> None:
    """UsageError unless ``path`` starts like a torch.save archive. torch.load would otherwise fall back
    to its legacy format and fail on a text file with a bare ``KeyError: 104``."""
    try:
        with open(path, "rb") as file:
            magic = file.read(len(ZIP_MAGIC))
    except OSError as error:
        raise UsageError(f"cannot read checkpoint {path} ({error.strerror or error}); check its permissions") from None
    if magic != ZIP_MAGIC:
        raise UsageError(f"{path} is not a PyTorch checkpoint, so not written by r2unet_fast.train; pass a run "
                         "folder or a .pt file the trainer wrote")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    name: str = "last.pt") -> dict[str, Any]:
    """Read a trainer checkpoint (a .pt file, or ``checkpoints/<name>`` of a run folder); UsageError when
    it is missing or foreign."""
    path = resolve_checkpoint(path, name)
    _check_archive(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # torch's weights_only failure puts the cause on its last line.
        reason = (lines[-1] if "WeightsUnpickler" in str(error) else lines[0]) if lines else type(error).__name__
        raise UsageError(f"cannot read checkpoint {path} ({reason}); it is damaged or not written by "
                         "r2unet_fast.train") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UsageError(f"{path} is not an r2unet_fast.train checkpoint (no model/config entries)")
    if state.get("format", 0) > FORMAT_VERSION:
        raise UsageError(f"checkpoint {path} has format {state['format']}; this r2unet_fast reads up to "
                         f"{FORMAT_VERSION}: upgrade the package")
    state["path"] = str(path)
    return state


def config_of(state: dict[str, Any]) -> TrainConfig:
    """The TrainConfig saved in a checkpoint."""
    return TrainConfig.from_dict(state["config"], source=f"checkpoint {state.get('path', '')}".strip())
