"""Decode cache (hits, invalidation, atomic files) and deterministic joint augmentation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data_fixtures import make_folder_tree
from r2unet_fast.data import (
    IMAGE_MEAN,
    IMAGE_STD,
    Sample,
    SegmentationDataset,
    SyntheticLesions,
    default_cache_dir,
    denormalize,
    load_image,
)
from r2unet_fast.data import io as data_io
from r2unet_fast.data.folder import folder_samples
from r2unet_fast.data.transforms import normalize, to_tensors


@pytest.fixture
def samples(tmp_path: Path) -> list[Sample]:
    return folder_samples(make_folder_tree(tmp_path / "data", 4, size=(40, 30)))


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Records every real decode the cache performs."""
    calls: list[Path] = []
    real = data_io.decode_resized

    def counting(image_path: Path, mask_path: Path | None, size: int):
        calls.append(image_path)
        return real(image_path, mask_path, size)

    monkeypatch.setattr(data_io, "decode_resized", counting)
    return calls


def _all_items(dataset) -> list[dict]:
    return [dataset[i] for i in range(len(dataset))]


def test_second_construction_hits_the_cache(
    tmp_path: Path, samples: list[Sample], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _all_items(SegmentationDataset(samples, 16, cache_dir=tmp_path / "cache"))

    def refuse(*args: object) -> None:
        raise AssertionError("decoded again despite a warm cache")

    monkeypatch.setattr(data_io, "decode_resized", refuse)
    second = _all_items(SegmentationDataset(samples, 16, cache_dir=tmp_path / "cache"))
    for a, b in zip(first, second):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    entries = list((tmp_path / "cache").rglob("*"))
    assert sorted({p.suffix for p in entries if p.is_file()}) == [".npy"]  # no temporary files left


def test_cache_invalidated_by_mtime_and_size(
    tmp_path: Path, samples: list[Sample], decode_calls: list[Path]
) -> None:
    _all_items(SegmentationDataset(samples, 16, cache_dir=tmp_path / "cache"))
    assert len(decode_calls) == 4
    stat = samples[2].image_path.stat()
    os.utime(samples[2].image_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _all_items(SegmentationDataset(samples, 16, cache_dir=tmp_path / "cache"))
    assert decode_calls[4:] == [samples[2].image_path]
    _all_items(SegmentationDataset(samples, 20, cache_dir=tmp_path / "cache"))
    assert len(decode_calls) == 9


def test_mask_change_invalidates(tmp_path: Path, samples: list[Sample], decode_calls: list[Path]) -> None:
    dataset = SegmentationDataset(samples, 16, cache_dir=tmp_path / "cache")
    dataset[1]
    Image.fromarray(np.full((30, 40), 255, np.uint8)).save(samples[1].mask_path)
    refreshed = SegmentationDataset(samples, 16, cache_dir=tmp_path / "cache")[1]
    assert len(decode_calls) == 2 and bool((refreshed["mask"] == 1).all())


def test_damaged_cache_entry_is_rebuilt(tmp_path: Path, samples: list[Sample], decode_calls: list[Path]) -> None:
    dataset = SegmentationDataset(samples, 16, cache_dir=tmp_path / "cache")
    expected = dataset[0]["image"]
    (entry,) = list((tmp_path / "cache").rglob("*.npy"))
    entry.write_bytes(b"junk")
    assert torch.equal(SegmentationDataset(samples, 16, cache_dir=tmp_path / "cache")[0]["image"], expected)
    assert len(decode_calls) == 2


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("R2UNET_FAST_CACHE", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("R2UNET_FAST_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "r2unet_fast"


def test_resize_matches_direct_decode(tmp_path: Path, samples: list[Sample]) -> None:
    item = SegmentationDataset(samples, 16, cache_dir=tmp_path / "cache")[3]
    image, mask = data_io.decode_resized(samples[3].image_path, samples[3].mask_path, 16)
    expected_image, expected_mask = to_tensors(image, mask)
    assert torch.equal(item["image"], expected_image) and torch.equal(item["mask"], expected_mask)
    assert item["mask"].sum() > 0


def test_normalisation_round_trip() -> None:
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    tensor = normalize(image)
    channel_means = tensor.mean(dim=(1, 2)).numpy()
    expected = (image.reshape(-1, 3).mean(0) / 255 - np.array(IMAGE_MEAN)) / np.array(IMAGE_STD)
    np.testing.assert_allclose(channel_means, expected, atol=1e-4)
    np.testing.assert_array_equal(denormalize(tensor), image)
    np.testing.assert_array_equal(denormalize(tensor[None])[0], image)


@pytest.fixture
def stripes(tmp_path: Path) -> list[Sample]:
    """Grey images whose mask is exactly "grey > 127" (blocky pattern, so alignment is checkable)."""
    rng = np.random.default_rng(0)
    samples = []
    for number in range(6):
        pattern = np.kron(rng.integers(0, 2, (8, 8)), np.ones((8, 8), np.int64)).astype(np.uint8)
        grey = pattern * 255
        image_path, mask_path = tmp_path / f"g{number}.png", tmp_path / f"g{number}_m.png"
        Image.fromarray(np.stack([grey] * 3, axis=-1)).save(image_path)
        Image.fromarray(grey).save(mask_path)
        samples.append(Sample(f"g{number}", image_path, mask_path))
    return samples


def test_augmentation_is_deterministic_per_seed_epoch_index(tmp_path: Path, stripes: list[Sample]) -> None:
    def draw(seed: int, epoch: int, index: int) -> dict:
        dataset = SegmentationDataset(stripes, 64, augment=True, seed=seed, cache_dir=tmp_path / "cache")
        dataset.set_epoch(epoch)
        return dataset[index]

    same = draw(1, 2, 3)
    again = draw(1, 2, 3)
    assert torch.equal(same["image"], again["image"]) and torch.equal(same["mask"], again["mask"])
    assert not torch.equal(same["image"], draw(1, 3, 3)["image"])
    assert not torch.equal(same["image"], draw(2, 2, 3)["image"])
    plain = SegmentationDataset(stripes, 64, cache_dir=tmp_path / "cache")[3]
    assert not torch.equal(same["image"], plain["image"])


def test_augmented_mask_stays_binary_and_aligned(tmp_path: Path, stripes: list[Sample]) -> None:
    dataset = SegmentationDataset(stripes, 64, augment=True, seed=0, cache_dir=tmp_path / "cache")
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for item in _all_items(dataset):
            mask = item["mask"][0].numpy()
            assert set(np.unique(mask)) <= {0.0, 1.0}
            # Colour jitter keeps black below and white above mid-grey, so this compares geometry only.
            grey = denormalize(item["image"]).astype(np.float32).mean(axis=2)
            agreement = np.mean((grey > 127) == (mask > 0.5))
            assert agreement > 0.97, (epoch, item["id"], agreement)


def test_augmentation_independent_of_worker_count(tmp_path: Path, stripes: list[Sample]) -> None:
    dataset = SegmentationDataset(stripes, 32, augment=True, seed=4, cache_dir=tmp_path / "cache")
    dataset.set_epoch(1)
    serial = torch.cat([batch["image"] for batch in DataLoader(dataset, batch_size=2)])
    loader = DataLoader(dataset, batch_size=2, num_workers=2, persistent_workers=True)
    parallel = torch.cat([batch["image"] for batch in loader])
    assert torch.equal(serial, parallel)
    # set_epoch reaches the already running persistent workers.
    dataset.set_epoch(2)
    next_epoch = torch.cat([batch["image"] for batch in loader])
    assert torch.equal(next_epoch, torch.stack([dataset[i]["image"] for i in range(len(dataset))]))
    assert not torch.equal(next_epoch, parallel)


def test_draft_decoding_of_large_jpeg_matches_full_decode(tmp_path: Path) -> None:
    path = tmp_path / "large.jpg"
    Image.fromarray(SyntheticLesions(1, 1024, seed=0).image(0)).save(path, quality=92)
    drafted, _ = data_io.decode_resized(path, None, 128)
    full = data_io.resize_image(load_image(path), 128)
    assert drafted.shape == (128, 128, 3)
    assert np.abs(drafted.astype(np.int16) - full).mean() < 1.5
