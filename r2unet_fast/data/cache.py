"""On-disk cache of decoded, resized samples.

Decoding a 6000-pixel dermoscopy JPEG costs far more than a training step on its
256-pixel version, so each (image, mask) pair is decoded and resized once and
stored as an uncompressed ``.npy`` of shape (S, S, 4) uint8: RGB plus the {0,1} mask.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..files import atomic_write
from . import io
from .errors import DataError

CACHE_ENV = "R2UNET_FAST_CACHE"
# Bump when the stored layout, the resize recipe or the mask decoding changes, so old entries are not
# reused. 2: masks read by data.masks (two-valued masks, any channel above half range), not grey > 127.
CACHE_VERSION = 2


def default_cache_dir() -> Path:
    """``$R2UNET_FAST_CACHE`` if set, else ``~/.cache/r2unet_fast``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "r2unet_fast"


def _file_identity(path: Path | None) -> list[object]:
    if path is None:
        return [None]
    resolved = path.resolve()
    stat = resolved.stat()
    return [str(resolved), stat.st_size, stat.st_mtime_ns]


class ResizeCache:
    """Decoded samples at one side length ``image_size``, stored under ``root``."""

    def __init__(self, root: Path, image_size: int) -> None:
        self.image_size = image_size
        self.folder = Path(root) / f"resized-v{CACHE_VERSION}-{image_size}"

    def key(self, image_path: Path, mask_path: Path | None) -> str:
        """Cache key from absolute paths, byte sizes and mtime_ns of both files, and the side length."""
        identity = [CACHE_VERSION, self.image_size, _file_identity(image_path), _file_identity(mask_path)]
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]

    def load(self, key: str, image_path: Path, mask_path: Path | None) -> tuple[np.ndarray, np.ndarray]:
        """The resized sample: uint8 (S, S, 3) image and uint8 (S, S) {0,1} mask, decoding on a miss."""
        entry = self._read(self.folder / f"{key}.npy")
        if entry is None:
            image, mask = io.decode_resized(image_path, mask_path, self.image_size)
            entry = np.concatenate([image, mask[..., None]], axis=2)
            self._write(self.folder / f"{key}.npy", entry)
        return np.ascontiguousarray(entry[..., :3]), np.ascontiguousarray(entry[..., 3])

    def _read(self, path: Path) -> np.ndarray | None:
        try:
            entry = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError):
            # A foreign or damaged file is simply rebuilt.
            return None
        expected = (self.image_size, self.image_size, 4)
        if entry.shape != expected or entry.dtype != np.uint8:
            return None
        # A mask channel outside {0, 1} was not written by this version: rebuild rather than train on it.
        return entry if entry[..., 3].max(initial=0) <= 1 else None

    def _write(self, path: Path, entry: np.ndarray) -> None:
        """Write atomically so concurrent workers or runs never read a half-written entry."""
        try:
            atomic_write(path, lambda file: np.save(file, entry, allow_pickle=False), durable=False)
        except OSError as error:
            raise DataError(
                f"cannot write the image cache in {self.folder} ({error.strerror or error}); "
                f"set ${CACHE_ENV} to a writable folder"
            ) from error
