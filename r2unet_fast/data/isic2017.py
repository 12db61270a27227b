"""ISIC 2017 Part 1 (lesion segmentation) in its official folder layout."""

from __future__ import annotations

from pathlib import Path

from . import io
from .base import Sample
from .errors import DataError

# split name -> (image folder, ground-truth folder) as released by ISIC.
ISIC2017_FOLDERS: dict[str, tuple[str, str]] = {
    "train": ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth"),
    "val": ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth"),
    "test": ("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth"),
}
ISIC2017_SPLITS = ("official", "alom", "all")
# Alom et al. (R2U-Net paper): the 2000 training images, sorted, cut 1250 / 150 / 600.
ALOM_SIZES: tuple[int, int, int] = (1250, 150, 600)
_LAYOUT_HINT = (
    "expected the official layout: ISIC-2017_Training_Data/ISIC_xxxxxxx.jpg with "
    "ISIC-2017_Training_Part1_GroundTruth/ISIC_xxxxxxx_segmentation.png, and likewise "
    "ISIC-2017_Validation_* and ISIC-2017_Test_v2_*"
)


def _folder(root: Path, name: str) -> Path:
    folder = root / name
    if not folder.is_dir():
        raise DataError(f"ISIC 2017 folder missing: {folder}; {_LAYOUT_HINT} under {root}")
    return folder


def isic2017_part(root: Path, part: str) -> list[Sample]:
    """Samples of one official part ("train", "val" or "test"), sorted by id.

    ``*_superpixels.png`` and metadata files in the image folder are ignored.
    """
    image_name, truth_name = ISIC2017_FOLDERS[part]
    images_dir, truth_dir = _folder(root, image_name), _folder(root, truth_name)
    images = io.index_by_stem(
        images_dir, [path for path in images_dir.iterdir() if not path.stem.endswith("_superpixels")]
    )
    if not images:
        raise DataError(f"no ISIC images (ISIC_xxxxxxx.jpg) in {images_dir}; {_LAYOUT_HINT}")
    masks = io.index_by_stem(truth_dir)
    return [
        Sample(stem, path, io.find_mask(path, masks, truth_dir, ("_segmentation",)))
        for stem, path in sorted(images.items())
    ]


def _alom(root: Path) -> dict[str, list[Sample]]:
    samples = isic2017_part(root, "train")
    if len(samples) != sum(ALOM_SIZES):
        folder = root / ISIC2017_FOLDERS["train"][0]
        raise DataError(
            f"the alom split needs the {sum(ALOM_SIZES)} official training images in {folder} "
            f"but {len(samples)} were found; restore the full training set or use split='official'"
        )
    n_train, n_val, _ = ALOM_SIZES
    return {
        "train": samples[:n_train],
        "val": samples[n_train : n_train + n_val],
        "test": samples[n_train + n_val :],
    }


def isic2017_splits(root: Path, split: str) -> dict[str, list[Sample]]:
    """Sample lists for ``split`` in ISIC2017_SPLITS: train/val/test, or {"all": ...}."""
    if split == "alom":
        return _alom(root)
    parts = {part: isic2017_part(root, part) for part in ISIC2017_FOLDERS}
    if split == "all":
        return {"all": [sample for samples in parts.values() for sample in samples]}
    return parts
