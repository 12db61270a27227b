"""ISIC 2017 loader on generated fixtures in the official layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from data_fixtures import isic_id, make_isic_tree
from r2unet_fast.data import DataError, build_datasets
from r2unet_fast.data.isic2017 import ISIC2017_FOLDERS, isic2017_splits

COUNTS = {"train": 7, "val": 3, "test": 5}


@pytest.fixture
def isic_root(tmp_path: Path) -> Path:
    return make_isic_tree(tmp_path / "isic", COUNTS)


@pytest.fixture(scope="module")
def alom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only the training part, with the 2000 images the alom split needs (read-only for tests)."""
    return make_isic_tree(tmp_path_factory.mktemp("alom"), {"train": 2000}, superpixels=False)


def test_official_split_uses_the_three_folders(isic_root: Path) -> None:
    splits = isic2017_splits(isic_root, "official")
    assert {part: len(samples) for part, samples in splits.items()} == COUNTS
    for part, samples in splits.items():
        assert [s.id for s in samples] == [isic_id(part, n) for n in range(COUNTS[part])]
        for sample in samples:
            assert sample.image_path.parent.name == ISIC2017_FOLDERS[part][0]
            assert sample.mask_path == isic_root / ISIC2017_FOLDERS[part][1] / f"{sample.id}_segmentation.png"


def test_superpixels_and_csv_are_ignored(isic_root: Path) -> None:
    samples = isic2017_splits(isic_root, "all")["all"]
    assert len(samples) == sum(COUNTS.values())
    assert all(s.image_path.suffix == ".jpg" and "superpixels" not in s.id for s in samples)


def test_build_datasets_official_default(isic_root: Path, tmp_path: Path) -> None:
    datasets = build_datasets("isic2017", isic_root, split="default", image_size=24, cache_dir=tmp_path / "c")
    assert {part: len(ds) for part, ds in datasets.items()} == COUNTS
    assert datasets["train"].augment and not datasets["val"].augment and not datasets["test"].augment
    item = datasets["test"][4]
    assert item["image"].shape == (3, 24, 24) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 24, 24) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["id"] == isic_id("test", 4) and item["index"] == 4


def test_alom_split_boundaries(alom_root: Path, tmp_path: Path) -> None:
    splits = isic2017_splits(alom_root, "alom")
    ids = sorted(isic_id("train", n) for n in range(2000))
    assert [s.id for s in splits["train"]] == ids[:1250]
    assert [s.id for s in splits["val"]] == ids[1250:1400]
    assert [s.id for s in splits["test"]] == ids[1400:]
    datasets = build_datasets("isic2017", alom_root, split="alom", image_size=8, cache_dir=tmp_path / "c")
    assert {part: len(ds) for part, ds in datasets.items()} == {"train": 1250, "val": 150, "test": 600}


def test_alom_split_needs_2000_training_images(isic_root: Path) -> None:
    with pytest.raises(DataError, match=r"2000 .* 7 were found") as error:
        isic2017_splits(isic_root, "alom")
    assert ISIC2017_FOLDERS["train"][0] in str(error.value)


def test_alom_split_ignores_missing_validation_and_test_folders(alom_root: Path) -> None:
    assert len(isic2017_splits(alom_root, "alom")["test"]) == 600
    with pytest.raises(DataError, match="ISIC-2017_Validation_Data"):
        isic2017_splits(alom_root, "official")


@pytest.mark.parametrize("part", ["train", "val", "test"])
@pytest.mark.parametrize("which", [0, 1])
def test_missing_folder_is_named(isic_root: Path, part: str, which: int) -> None:
    missing = isic_root / ISIC2017_FOLDERS[part][which]
    shutil.rmtree(missing)
    with pytest.raises(DataError, match="official layout") as error:
        build_datasets("isic2017", isic_root, split="official", image_size=8)
    assert str(missing) in str(error.value)


def test_missing_mask_names_image_and_expected_mask(isic_root: Path) -> None:
    mask = isic_root / ISIC2017_FOLDERS["val"][1] / f"{isic_id('val', 1)}_segmentation.png"
    mask.unlink()
    with pytest.raises(DataError, match="mask missing for image") as error:
        isic2017_splits(isic_root, "official")
    assert str(mask) in str(error.value) and f"{isic_id('val', 1)}.jpg" in str(error.value)


def test_empty_image_folder(isic_root: Path) -> None:
    for path in (isic_root / ISIC2017_FOLDERS["test"][0]).glob("*.jpg"):
        path.unlink()
    with pytest.raises(DataError, match="no ISIC images") as error:
        isic2017_splits(isic_root, "official")
    assert ISIC2017_FOLDERS["test"][0] in str(error.value)
