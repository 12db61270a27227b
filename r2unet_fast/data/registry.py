"""``build_datasets``: dataset name + split -> ready-to-use torch Datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

from .base import Sample, SegmentationDataset
from .errors import DataError
from .folder import folder_samples
from .isic2017 import ISIC2017_SPLITS, isic2017_part, isic2017_splits
from .ph2 import ph2_samples
from .splits import SPLIT_NAMES, seeded_split
from .synthetic import SyntheticLesions

DATASETS: tuple[str, ...] = ("synthetic", "isic2017", "ph2", "folder")
# Valid split names per dataset; the first is what split="default" means.
SPLITS: dict[str, tuple[str, ...]] = {
    "synthetic": ("seeded", "all"),
    "isic2017": ISIC2017_SPLITS,
    "ph2": ("seeded", "all"),
    "folder": ("seeded", "all"),
}
# Large odd multiplier so nearby user seeds never share a split seed.
_SEED_STRIDE = 1000003
_SYNTHETIC_OFFSETS = {"train": 0, "val": 1, "test": 2, "all": 3}
_SAMPLE_LISTERS: dict[str, Callable[[Path], list[Sample]]] = {"ph2": ph2_samples, "folder": folder_samples}


def resolve_split(name: str, split: str) -> str:
    """Validate ``name`` and ``split`` and map ``"default"`` to the dataset's standard split."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split == "default":
        return SPLITS[name][0]
    if split not in SPLITS[name]:
        raise DataError(f"unknown split {split!r} for {name}; choose one of default, {', '.join(SPLITS[name])}")
    return split


def _checked_root(name: str, root: Path | None) -> Path:
    if root is None:
        raise DataError(f"dataset {name} needs a root folder; pass the folder that holds it")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"root folder {root} for dataset {name} does not exist; check the path")
    return root


def _listed(name: str, root: Path | None, split: str) -> tuple[Path, str]:
    split = resolve_split(name, split)
    if name == "synthetic":
        raise DataError("the synthetic dataset has no files; write some with write_synthetic_folder")
    return _checked_root(name, root), split


def sample_splits(name: str, root: Path | None, *, split: str, seed: int = 0) -> dict[str, list[Sample]]:
    """The original-resolution files per part for a file-backed dataset (not "synthetic").

    Keys are "train", "val", "test", or only "all" for split="all"; each list is what
    ``build_datasets`` wraps, in the same order.
    """
    root, split = _listed(name, root, split)
    if name == "isic2017":
        return isic2017_splits(root, split)
    samples = _SAMPLE_LISTERS[name](root)
    return {"all": samples} if split == "all" else seeded_split(samples, seed, root)


def scheme_samples(name: str, root: Path | None, *, split: str) -> list[Sample]:
    """Every case split scheme ``split`` draws its parts from: what a stored split is matched against."""
    root, split = _listed(name, root, split)
    if name == "isic2017":
        # alom cuts the training folder only; listing it directly skips alom's exact-count check, so added
        # images are reported and left out like anywhere else.
        if split == "alom":
            return isic2017_part(root, "train")
        return isic2017_splits(root, "all")["all"]
    return _SAMPLE_LISTERS[name](root)


def file_datasets(lists: dict[str, list[Sample]], image_size: int, *, seed: int = 0, augment: bool = True,
                  cache_dir: Path | None = None) -> dict[str, SegmentationDataset]:
    """One SegmentationDataset per part of ``lists``; only "train" is augmented (when ``augment``)."""
    return {
        part: SegmentationDataset(
            samples, image_size, augment=augment and part == "train", seed=seed, cache_dir=cache_dir
        )
        for part, samples in lists.items()
    }


def _synthetic(
    split: str, seed: int, image_size: int, augment: bool, sizes: tuple[int, int, int]
) -> dict[str, Dataset]:
    counts = dict(zip(SPLIT_NAMES, sizes), all=sum(sizes))
    names = ("all",) if split == "all" else SPLIT_NAMES
    return {
        part: SyntheticLesions(
            counts[part],
            image_size,
            seed * _SEED_STRIDE + _SYNTHETIC_OFFSETS[part],
            augment=augment and part == "train",
        )
        for part in names
    }


def build_datasets(
    name: str,
    root: Path | None,
    *,
    split: str,
    image_size: int,
    seed: int = 0,
    augment: bool = True,
    cache_dir: Path | None = None,
    synthetic_sizes: tuple[int, int, int] = (240, 40, 80),
) -> dict[str, Dataset]:
    """Datasets for one of ``DATASETS``: keys "train", "val", "test", or only "all" for split="all".

    Only "train" is augmented (when ``augment``); "val", "test" and "all" never are. ``seed``
    drives seeded splits, synthetic generation and augmentation. Items are as in
    ``SegmentationDataset.__getitem__``.
    Raises ``DataError`` for an unknown name/split or bad data on disk.
    """
    if name == "synthetic":
        if root is not None:
            raise DataError(f"the synthetic dataset is generated, not read: drop the root folder {root}")
        return _synthetic(resolve_split(name, split), seed, image_size, augment, synthetic_sizes)
    lists = sample_splits(name, root, split=split, seed=seed)
    return file_datasets(lists, image_size, seed=seed, augment=augment, cache_dir=cache_dir)
