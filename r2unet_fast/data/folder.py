"""A generic ``images/`` + ``masks/`` folder dataset."""

from __future__ import annotations

from pathlib import Path

from . import io
from .base import Sample
from .errors import DataError

MASK_SUFFIXES: tuple[str, ...] = ("", "_mask", "_segmentation")
_LAYOUT_HINT = "expected images/<name>.<ext> with masks/<name>.png, <name>_mask.png or <name>_segmentation.png"


def folder_samples(root: Path) -> list[Sample]:
    """Every image in ``root/images`` paired by stem with its mask in ``root/masks``, sorted by id."""
    images_dir, masks_dir = root / "images", root / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise DataError(f"folder missing: {folder}; {_LAYOUT_HINT} under {root}")
    images = io.index_by_stem(images_dir)
    if not images:
        raise DataError(f"no images ({io.EXTENSION_HINT}) in {images_dir}; add some or point the root elsewhere")
    masks = io.index_by_stem(masks_dir)
    return [
        Sample(stem, path, io.find_mask(path, masks, masks_dir, MASK_SUFFIXES))
        for stem, path in sorted(images.items())
    ]
