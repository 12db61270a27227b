"""Generic images/ + masks/ folder loader and the seeded split."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_fixtures import make_folder_tree, write_pair
from r2unet_fast.data import DataError, build_datasets, sample_splits
from r2unet_fast.data.folder import folder_samples


def _ids(splits: dict) -> dict[str, list[str]]:
    return {part: [s.id for s in samples] for part, samples in splits.items()}


@pytest.mark.parametrize("suffix", ["", "_mask", "_segmentation"])
def test_masks_matched_by_stem(tmp_path: Path, suffix: str) -> None:
    make_folder_tree(tmp_path, 4, mask_suffix=suffix)
    samples = folder_samples(tmp_path)
    assert [s.id for s in samples] == ["img_00", "img_01", "img_02", "img_03"]
    assert all(s.mask_path.name == f"{s.id}{suffix}.png" for s in samples)


def test_mixed_extensions(tmp_path: Path) -> None:
    write_pair(tmp_path / "images" / "a.jpg", tmp_path / "masks" / "a_mask.bmp")
    write_pair(tmp_path / "images" / "b.tif", tmp_path / "masks" / "b.gif")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    samples = folder_samples(tmp_path)
    assert [(s.id, s.mask_path.name) for s in samples] == [("a", "a_mask.bmp"), ("b", "b.gif")]
    dataset = build_datasets("folder", tmp_path, split="all", image_size=8, cache_dir=tmp_path / "c")["all"]
    assert dataset[1]["image"].shape == (3, 8, 8)


@pytest.mark.parametrize(("count", "sizes"), [(3, (1, 1, 1)), (4, (2, 1, 1)), (10, (7, 1, 2)), (20, (14, 2, 4))])
def test_seeded_split_sizes(tmp_path: Path, count: int, sizes: tuple[int, int, int]) -> None:
    make_folder_tree(tmp_path, count, size=(6, 5))
    splits = sample_splits("folder", tmp_path, split="seeded", seed=0)
    assert tuple(len(splits[part]) for part in ("train", "val", "test")) == sizes


def test_seeded_split_is_disjoint_covering_and_deterministic(tmp_path: Path) -> None:
    make_folder_tree(tmp_path, 20, size=(6, 5))
    first = _ids(sample_splits("folder", tmp_path, split="seeded", seed=5))
    again = _ids(sample_splits("folder", tmp_path, split="seeded", seed=5))
    other = _ids(sample_splits("folder", tmp_path, split="seeded", seed=6))
    assert first == again and first != other
    everything = [i for ids in first.values() for i in ids]
    assert sorted(everything) == [f"img_{n:02d}" for n in range(20)]


def test_build_datasets_folder(tmp_path: Path) -> None:
    make_folder_tree(tmp_path, 10)
    cache = tmp_path / "c"
    datasets = build_datasets("folder", tmp_path, split="default", image_size=12, augment=False, cache_dir=cache)
    assert {part: len(ds) for part, ds in datasets.items()} == {"train": 7, "val": 1, "test": 2}
    assert not datasets["train"].augment
    assert list(build_datasets("folder", tmp_path, split="all", image_size=12, cache_dir=cache)) == ["all"]


def test_too_few_for_a_split(tmp_path: Path) -> None:
    make_folder_tree(tmp_path, 2)
    with pytest.raises(DataError, match="at least 3"):
        build_datasets("folder", tmp_path, split="seeded", image_size=8)
    assert len(build_datasets("folder", tmp_path, split="all", image_size=8, cache_dir=tmp_path / "c")["all"]) == 2
