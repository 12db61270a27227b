"""Masks are read as their authors mean them (issue #16 item 3), and stale decodes are not reused."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data_fixtures import make_folder_tree, mask_array
from r2unet_fast.data import DataError, SegmentationDataset, load_mask
from r2unet_fast.data import cache as data_cache
from r2unet_fast.data.base import AugmentedItems
from r2unet_fast.data.folder import folder_samples

ELLIPSE = (mask_array(24, 18, 3) > 0).astype(np.uint8)


def _save(array: np.ndarray, path, **kwargs) -> object:
    Image.fromarray(array).save(path, **kwargs)
    return path


def test_red_on_black_rgb_mask_is_the_lesion(tmp_path) -> None:
    # Pure red is grey level 76: a grey threshold at 127 read these as empty.
    red = np.zeros((*ELLIPSE.shape, 3), np.uint8)
    red[ELLIPSE == 1] = (255, 0, 0)
    np.testing.assert_array_equal(load_mask(_save(red, tmp_path / "red.png")), ELLIPSE)


def test_anti_aliased_coloured_mask_uses_any_channel_above_half_range(tmp_path) -> None:
    blue = np.zeros((*ELLIPSE.shape, 3), np.uint8)
    blue[ELLIPSE == 1] = (0, 30, 200)
    blue[0, 0] = (0, 0, 90)  # a third value (an anti-aliased edge): below half range, so background
    expected = ELLIPSE.copy()
    expected[0, 0] = 0
    np.testing.assert_array_equal(load_mask(_save(blue, tmp_path / "blue.png")), expected)


def test_two_valued_masks_mark_the_higher_value(tmp_path) -> None:
    np.testing.assert_array_equal(load_mask(_save(ELLIPSE * np.uint8(100), tmp_path / "faint.png")), ELLIPSE)
    np.testing.assert_array_equal(load_mask(_save(ELLIPSE, tmp_path / "labels.png")), ELLIPSE)
    inverted_grey = np.where(ELLIPSE == 1, 230, 200).astype(np.uint8)
    np.testing.assert_array_equal(load_mask(_save(inverted_grey, tmp_path / "two_greys.png")), ELLIPSE)


def test_palette_16_bit_and_transparent_masks(tmp_path) -> None:
    palette = Image.fromarray(ELLIPSE, "P")
    palette.putpalette([0, 0, 0, 200, 0, 0])
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "palette.png"), ELLIPSE)
    deep = (ELLIPSE.astype(np.uint16) * 40000 + np.arange(ELLIPSE.size, dtype=np.uint16).reshape(ELLIPSE.shape))
    np.testing.assert_array_equal(load_mask(_save(deep, tmp_path / "deep.png")), ELLIPSE)
    overlay = np.zeros((*ELLIPSE.shape, 4), np.uint8)
    overlay[..., :3] = 255  # white everywhere, but only the lesion is opaque
    overlay[..., 3] = np.where(ELLIPSE == 1, 255, 0)
    overlay[0, 0] = (255, 255, 255, 10)  # a third value: still transparent, so background
    np.testing.assert_array_equal(load_mask(_save(overlay, tmp_path / "overlay.png")), ELLIPSE)


def test_plain_grey_masks_still_threshold_at_half_range(tmp_path) -> None:
    grey = np.array([[0, 127, 128, 255]], np.uint8)
    np.testing.assert_array_equal(load_mask(_save(grey, tmp_path / "grey.png")), [[0, 0, 1, 1]])
    empty = np.zeros((4, 4), np.uint8)
    assert load_mask(_save(empty, tmp_path / "empty.png")).sum() == 0
    full = np.full((4, 4), 255, np.uint8)
    assert load_mask(_save(full, tmp_path / "full.png")).min() == 1


def test_cache_entries_decoded_by_the_old_rule_are_not_reused(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_folder_tree(tmp_path / "data", 1, size=(24, 18))
    (sample,) = folder_samples(root)
    red = np.zeros((18, 24, 3), np.uint8)
    red[ELLIPSE == 1] = (255, 0, 0)
    _save(red, sample.mask_path)
    # What the version-1 cache held for this pair: the right image, an all-empty mask.
    with monkeypatch.context() as patch:
        patch.setattr(data_cache, "CACHE_VERSION", 1)
        old = data_cache.ResizeCache(tmp_path / "cache", 16)
        key = old.key(sample.image_path, sample.mask_path)
        old._write(old.folder / f"{key}.npy", np.zeros((16, 16, 4), np.uint8))
    item = SegmentationDataset([sample], 16, cache_dir=tmp_path / "cache")[0]
    assert item["mask"].sum() > 0


def test_cache_entry_with_a_non_binary_mask_is_rebuilt(tmp_path) -> None:
    root = make_folder_tree(tmp_path / "data", 1, size=(24, 18))
    dataset = SegmentationDataset(folder_samples(root), 16, cache_dir=tmp_path / "cache")
    expected = dataset[0]["mask"]
    (entry,) = list((tmp_path / "cache").rglob("*.npy"))
    stale = np.load(entry)
    stale[..., 3] *= 255
    np.save(entry, stale)
    assert set(SegmentationDataset(folder_samples(root), 16, cache_dir=tmp_path / "cache")[0]["mask"].unique()
               .tolist()) == set(expected.unique().tolist()) <= {0.0, 1.0}


class _Grey255(AugmentedItems):
    """A custom dataset whose masks are 0/255, as a subclass might return by mistake."""

    def __len__(self) -> int:
        return 1

    def _arrays(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        return np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 255, np.uint8), "grey255"


def test_mask_values_outside_0_1_never_reach_the_loss() -> None:
    with pytest.raises(DataError, match="grey255.*0 and 1"):
        _Grey255(8, augment=False, seed=0)[0]
