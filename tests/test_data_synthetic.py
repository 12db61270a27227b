"""Procedural dermoscopy-like lesions: determinism, variety, mask/lesion agreement, speed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from r2unet_fast.data import SyntheticLesions, build_datasets, load_image, load_mask, write_synthetic_folder
from r2unet_fast.data import synthetic
from r2unet_fast.data.folder import folder_samples


@pytest.fixture(scope="module")
def rendered() -> list[tuple[np.ndarray, np.ndarray]]:
    lesions = SyntheticLesions(40, 96, seed=11)
    return [lesions.render(i) for i in range(40)]


def test_items_have_the_dataset_contract() -> None:
    item = SyntheticLesions(3, 48, seed=0)[2]
    assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 48, 48) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert item["id"] == "syn_0002" and item["index"] == 2
    with pytest.raises(IndexError):
        SyntheticLesions(3, 48, seed=0)[3]


def test_deterministic_per_seed_and_index() -> None:
    a, b = SyntheticLesions(4, 64, seed=7), SyntheticLesions(9, 64, seed=7)
    np.testing.assert_array_equal(a.image(3), b.image(3))
    np.testing.assert_array_equal(a.mask(3), b.mask(3))
    assert a.image(3).dtype == np.uint8 and a.image(3).shape == (64, 64, 3)
    assert a.mask(3).dtype == np.uint8 and a.mask(3).shape == (64, 64)
    assert not np.array_equal(a.image(3), a.image(2))
    assert not np.array_equal(a.image(3), SyntheticLesions(4, 64, seed=8).image(3))


def test_variety(rendered: list[tuple[np.ndarray, np.ndarray]]) -> None:
    areas = np.array([mask.mean() for _, mask in rendered])
    assert areas.min() >= 0.07 and areas.max() <= 0.46
    assert areas.min() < 0.15 and areas.max() > 0.35
    centre = _central_disk(96)
    skin = np.array([image[(mask == 0) & centre].mean(axis=0) for image, mask in rendered])
    assert np.ptp(skin.mean(axis=1)) > 60  # light and dark skin both occur
    lesion = np.array([image[mask == 1].mean(axis=0) for image, mask in rendered])
    assert (lesion[:, 2] > lesion[:, 0]).any() and (lesion[:, 0] > lesion[:, 2] + 30).any()  # bluish and brown


def _central_disk(size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return np.hypot(y - size / 2, x - size / 2) < 0.4 * size


def test_lesion_is_darker_than_skin_and_corners_are_dark(rendered: list[tuple[np.ndarray, np.ndarray]]) -> None:
    centre = _central_disk(96)
    for image, mask in rendered:
        grey = image.astype(np.float32).mean(axis=2)
        assert grey[mask == 1].mean() < grey[(mask == 0) & centre].mean() - 10
    corners = np.array([image[:6, :6].mean() for image, _ in rendered])
    assert np.median(corners) < 50  # dermoscope vignetting


def test_hair_is_drawn_over_the_lesion_but_not_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    lesions = SyntheticLesions(12, 96, seed=3)
    with_hair = [lesions.render(i) for i in range(12)]
    real = synthetic._hair_coverage
    # Still draw the hairs (same random stream downstream), just paint none of them.
    monkeypatch.setattr(synthetic, "_hair_coverage", lambda rng, size: real(rng, size) * 0.0)
    hairless = [lesions.render(i) for i in range(12)]
    hair_over_lesion = 0
    for (image, mask), (bare, bare_mask) in zip(with_hair, hairless):
        np.testing.assert_array_equal(mask, bare_mask)
        darker = image.astype(np.int16).mean(axis=2) < bare.astype(np.int16).mean(axis=2) - 25
        hair_over_lesion += int((darker & (mask == 1)).any())
    assert hair_over_lesion >= 3


def test_augmented_synthetic_is_deterministic() -> None:
    plain = SyntheticLesions(3, 48, seed=5)[1]
    augmented = SyntheticLesions(3, 48, seed=5, augment=True)
    augmented.set_epoch(4)
    first, second = augmented[1], augmented[1]
    assert torch.equal(first["image"], second["image"]) and torch.equal(first["mask"], second["mask"])
    assert not torch.equal(first["image"], plain["image"])
    assert set(first["mask"].unique().tolist()) <= {0.0, 1.0}


def test_write_synthetic_folder_round_trip(tmp_path: Path) -> None:
    root = write_synthetic_folder(tmp_path / "syn", 5, 32, seed=2)
    assert root == tmp_path / "syn"
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"syn_{i:04d}.png" for i in range(5)]
    samples = folder_samples(root)
    lesions = SyntheticLesions(5, 32, seed=2)
    np.testing.assert_array_equal(load_image(samples[4].image_path), lesions.image(4))
    np.testing.assert_array_equal(load_mask(samples[4].mask_path), lesions.mask(4))
    assert set(np.unique(np.asarray(Image.open(samples[0].mask_path)))) == {0, 255}


def test_build_synthetic_splits() -> None:
    datasets = build_datasets("synthetic", None, split="default", image_size=32, seed=1, synthetic_sizes=(6, 2, 3))
    assert {part: len(ds) for part, ds in datasets.items()} == {"train": 6, "val": 2, "test": 3}
    assert datasets["train"].augment and not datasets["val"].augment and not datasets["test"].augment
    firsts = [ds.image(0) for ds in datasets.values()]
    assert not np.array_equal(firsts[0], firsts[1]) and not np.array_equal(firsts[1], firsts[2])
    again = build_datasets("synthetic", None, split="default", image_size=32, seed=1, synthetic_sizes=(6, 2, 3))
    np.testing.assert_array_equal(again["val"].image(1), datasets["val"].image(1))
    everything = build_datasets("synthetic", None, split="all", image_size=32, synthetic_sizes=(6, 2, 3))
    assert list(everything) == ["all"] and len(everything["all"]) == 11
