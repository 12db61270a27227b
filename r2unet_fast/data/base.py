"""The file-backed segmentation Dataset and the item logic it shares with synthetic data."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import io
from .cache import ResizeCache, default_cache_dir
from .errors import DataError
from .transforms import Augmenter, to_tensors

Item = dict[str, object]


@dataclass(frozen=True)
class Sample:
    """One labelled image on disk; ``mask_path`` None means unlabelled (its mask reads as all zeros)."""

    id: str
    image_path: Path
    mask_path: Path | None


class AugmentedItems(Dataset):
    """Epoch-aware, deterministic augmentation and item assembly for square uint8 samples.

    Subclasses implement ``__len__`` and ``_arrays(index)``.
    """

    def __init__(self, image_size: int, *, augment: bool, seed: int) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        # Shared memory so set_epoch reaches DataLoader workers that already exist
        # (persistent_workers=True), not only the main process's copy.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._augmenter = Augmenter() if augment else None

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw; call before iterating the DataLoader for that epoch."""
        self._epoch.fill_(epoch)

    def without_augmentation(self) -> "AugmentedItems":
        """A view of the same items, un-augmented (for mask statistics and BatchNorm calibration)."""
        plain = copy.copy(self)
        plain.augment, plain._augmenter = False, None
        return plain

    def __len__(self) -> int:
        raise NotImplementedError

    def _arrays(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        """uint8 (S, S, 3) image, uint8 (S, S) {0,1} mask and the id of item ``index``."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> Item:
        """{"image": float32 (3,S,S) normalised, "mask": float32 (1,S,S) in {0,1}, "id": str, "index": int}."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        image, mask, sample_id = self._arrays(index)
        if mask.max(initial=0) > 1:
            # The losses assume {0, 1} targets; a 0/255 mask would silently train on a wrong objective.
            raise DataError(f"mask of item {sample_id} holds values other than 0 and 1 (max {int(mask.max())}); "
                            "decode masks with r2unet_fast.data.load_mask or binarize them in _arrays")
        if self._augmenter is not None:
            image, mask = self._augmenter(image, mask, self.seed, self.epoch, index)
        image_tensor, mask_tensor = to_tensors(image, mask)
        return {"image": image_tensor, "mask": mask_tensor, "id": sample_id, "index": index}


class SegmentationDataset(AugmentedItems):
    """Image/mask files resized to (S, S) through an on-disk cache.

    Every sample's headers are validated at construction (readable RGB image, existing
    mask of the same size), so bad input raises ``DataError`` before training starts.
    ``samples[item["index"]]`` gives the original-resolution files of an item.
    """

    def __init__(
        self,
        samples: list[Sample],
        image_size: int,
        *,
        augment: bool = False,
        seed: int = 0,
        cache_dir: Path | None = None,
    ) -> None:
        super().__init__(image_size, augment=augment, seed=seed)
        self.samples = list(samples)
        self.cache = ResizeCache(default_cache_dir() if cache_dir is None else Path(cache_dir), image_size)
        for sample in self.samples:
            io.check_pair(sample.image_path, sample.mask_path)
        self._keys = [self.cache.key(s.image_path, s.mask_path) for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _arrays(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        sample = self.samples[index]
        image, mask = self.cache.load(self._keys[index], sample.image_path, sample.mask_path)
        return image, mask, sample.id
