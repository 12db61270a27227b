"""PH2 loader: the real shared cases (skipped when absent) and generated layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import make_ph2_tree, ph2_root
from r2unet_fast.data import DataError, build_datasets, load_image, load_mask
from r2unet_fast.data.ph2 import PH2_FOLDER, ph2_samples


@pytest.fixture(scope="module")
def real_root() -> Path:
    root = ph2_root()
    if root is None:
        pytest.skip("real PH2 data not found (set R2UNET_FAST_PH2)")
    return root


def test_real_ph2_has_150_cases_in_either_root_form(real_root: Path) -> None:
    outer = ph2_samples(real_root)
    inner = ph2_samples(real_root / PH2_FOLDER)
    assert len(outer) == 150 and outer == inner
    assert [s.id for s in outer] == sorted(s.id for s in outer)


def test_real_ph2_seeded_split(real_root: Path, tmp_path: Path) -> None:
    datasets = build_datasets("ph2", real_root, split="default", image_size=64, cache_dir=tmp_path)
    assert {part: len(ds) for part, ds in datasets.items()} == {"train": 105, "val": 15, "test": 30}
    ids = [s.id for ds in datasets.values() for s in ds.samples]
    assert len(set(ids)) == 150
    assert len(build_datasets("ph2", real_root, split="all", image_size=64, cache_dir=tmp_path)["all"]) == 150


def test_real_ph2_mask_is_binary_with_lesion(real_root: Path, tmp_path: Path) -> None:
    sample = ph2_samples(real_root)[0]
    image, mask = load_image(sample.image_path), load_mask(sample.mask_path)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert mask.shape == image.shape[:2] and set(np.unique(mask)) == {0, 1}
    dataset = build_datasets("ph2", real_root, split="all", image_size=96, cache_dir=tmp_path)["all"]
    item = dataset[0]
    assert item["id"] == sample.id
    assert item["image"].shape == (3, 96, 96) and item["mask"].shape == (1, 96, 96)
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    # The resized mask keeps the lesion's share of the picture.
    assert abs(item["mask"].mean().item() - mask.mean()) < 0.02


def test_generated_ph2_layout(tmp_path: Path) -> None:
    cases = make_ph2_tree(tmp_path, 10)
    datasets = build_datasets("ph2", tmp_path, split="seeded", image_size=16, seed=3, cache_dir=tmp_path / "c")
    assert {part: len(ds) for part, ds in datasets.items()} == {"train": 7, "val": 1, "test": 2}
    assert datasets["train"].samples[0].image_path.parent.parent.parent == cases


def test_root_without_cases(tmp_path: Path) -> None:
    (tmp_path / "something_else").mkdir()
    with pytest.raises(DataError, match="no PH2 cases") as error:
        build_datasets("ph2", tmp_path, split="default", image_size=16)
    assert str(tmp_path) in str(error.value)


def test_missing_lesion_mask(tmp_path: Path) -> None:
    cases = make_ph2_tree(tmp_path, 4)
    shutil.rmtree(cases / "IMD003" / "IMD003_lesion")
    with pytest.raises(DataError, match="mask missing for image") as error:
        ph2_samples(tmp_path)
    assert "IMD003_lesion.bmp" in str(error.value) and "IMD003.bmp" in str(error.value)


def test_case_without_image(tmp_path: Path) -> None:
    cases = make_ph2_tree(tmp_path, 4)
    (cases / "IMD004" / "IMD004_Dermoscopic_Image" / "IMD004.bmp").unlink()
    with pytest.raises(DataError, match="IMD004.bmp"):
        ph2_samples(tmp_path)
