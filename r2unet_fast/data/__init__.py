"""Data layer: datasets, file loading/validation, augmentation and synthetic lesions.

Every dataset item is ``{"image": float32 (3, S, S) normalised with IMAGE_MEAN/IMAGE_STD,
"mask": float32 (1, S, S) in {0, 1}, "id": str, "index": int}``. Bad input raises
``DataError`` whose one-line message names the file and the fix.
"""

from .base import Sample, SegmentationDataset
from .cache import default_cache_dir
from .errors import DataError
from .io import load_image, load_mask
from .registry import DATASETS, SPLITS, build_datasets, sample_splits
from .synthetic import SyntheticLesions, write_synthetic_folder
from .transforms import IMAGE_MEAN, IMAGE_STD, denormalize

__all__ = [
    "DATASETS",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "SPLITS",
    "DataError",
    "Sample",
    "SegmentationDataset",
    "SyntheticLesions",
    "build_datasets",
    "default_cache_dir",
    "denormalize",
    "load_image",
    "load_mask",
    "sample_splits",
    "write_synthetic_folder",
]
