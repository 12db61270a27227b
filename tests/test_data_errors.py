"""Every kind of bad input raises a one-line DataError naming the file or folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_fixtures import make_folder_tree, rgb_array, write_pair
from r2unet_fast.data import DataError, Sample, SegmentationDataset, build_datasets, load_image, load_mask


def _dataset(tmp_path: Path, **kwargs) -> dict:
    return build_datasets("folder", tmp_path, split="all", image_size=8, cache_dir=tmp_path / "cache", **kwargs)


def _assert_names(error: pytest.ExceptionInfo, *paths: Path) -> None:
    message = str(error.value)
    assert "\n" not in message
    for path in paths:
        assert str(path) in message


def test_data_error_is_a_one_line_value_error() -> None:
    error = DataError("first line\nsecond line")
    assert isinstance(error, ValueError) and str(error) == "first line second line"


def test_unreadable_image(tmp_path: Path) -> None:
    make_folder_tree(tmp_path, 3)
    broken = tmp_path / "images" / "img_01.png"
    broken.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="cannot read image") as error:
        _dataset(tmp_path)
    _assert_names(error, broken)
    with pytest.raises(DataError) as error:
        load_image(broken)
    _assert_names(error, broken)


def test_truncated_image_fails_when_decoded(tmp_path: Path) -> None:
    truncated = tmp_path / "images" / "img_00.jpg"
    write_pair(truncated, tmp_path / "masks" / "img_00.png", size=(200, 160))
    truncated.write_bytes(truncated.read_bytes()[:-2000])
    dataset = _dataset(tmp_path)["all"]  # headers are intact, so construction succeeds
    with pytest.raises(DataError, match="cannot read image") as error:
        dataset[0]
    _assert_names(error, truncated)


def test_missing_mask(tmp_path: Path) -> None:
    make_folder_tree(tmp_path, 3)
    (tmp_path / "masks" / "img_02.png").unlink()
    with pytest.raises(DataError, match="mask missing for image") as error:
        _dataset(tmp_path)
    _assert_names(error, tmp_path / "images" / "img_02.png", tmp_path / "masks" / "img_02.png")
    assert "img_02_mask.png" in str(error.value) and "add it or remove the image" in str(error.value)


def test_missing_mask_of_explicit_sample(tmp_path: Path) -> None:
    make_folder_tree(tmp_path, 1)
    image = tmp_path / "images" / "img_00.png"
    absent = tmp_path / "masks" / "nope.png"
    with pytest.raises(DataError, match="mask missing") as error:
        SegmentationDataset([Sample("x", image, absent)], 8, cache_dir=tmp_path)
    _assert_names(error, image, absent)


def test_mask_of_another_size(tmp_path: Path) -> None:
    make_folder_tree(tmp_path, 2)
    mask = tmp_path / "masks" / "img_01.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask)
    with pytest.raises(DataError, match="12x10 but its image") as error:
        _dataset(tmp_path)
    _assert_names(error, mask, tmp_path / "images" / "img_01.png")
    assert "20x16" in str(error.value)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="no images") as error:
        _dataset(tmp_path)
    _assert_names(error, tmp_path / "images")


def test_folder_without_images_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="folder missing") as error:
        _dataset(tmp_path)
    _assert_names(error, tmp_path / "images")


def test_duplicate_stems(tmp_path: Path) -> None:
    make_folder_tree(tmp_path, 2)
    Image.fromarray(rgb_array(20, 16, 0)).save(tmp_path / "images" / "img_00.jpg")
    with pytest.raises(DataError, match="share the id") as error:
        _dataset(tmp_path)
    _assert_names(error, tmp_path / "images" / "img_00.jpg", tmp_path / "images" / "img_00.png")


@pytest.mark.parametrize(
    ("mode", "problem"),
    [("L", "grayscale"), ("I;16", "grayscale"), ("1", "grayscale"), ("F", "grayscale"),
     ("RGBA", "transparency"), ("LA", "transparency")],
)
def test_non_rgb_images_are_refused(tmp_path: Path, mode: str, problem: str) -> None:
    make_folder_tree(tmp_path, 2)
    image = tmp_path / "images" / "img_01.tif"
    (tmp_path / "images" / "img_01.png").unlink()
    Image.fromarray(rgb_array(20, 16, 1)).convert(mode).save(image)
    with pytest.raises(DataError, match=f"{problem}.*convert it to 3-channel RGB") as error:
        _dataset(tmp_path)
    _assert_names(error, image)
    with pytest.raises(DataError, match="convert it to 3-channel RGB"):
        load_image(image)


def test_palette_images(tmp_path: Path) -> None:
    picture = Image.fromarray(rgb_array(20, 16, 1)).convert("P", palette=Image.Palette.ADAPTIVE)
    opaque = tmp_path / "opaque.png"
    picture.save(opaque)
    assert load_image(opaque).shape == (16, 20, 3)
    transparent = tmp_path / "transparent.png"
    picture.save(transparent, transparency=0)
    with pytest.raises(DataError, match="transparency") as error:
        load_image(transparent)
    _assert_names(error, transparent)


def test_load_mask_binarises_grey_levels(tmp_path: Path) -> None:
    path = tmp_path / "mask.png"
    Image.fromarray(np.array([[0, 127, 128, 255]], np.uint8)).save(path)
    np.testing.assert_array_equal(load_mask(path), [[0, 0, 1, 1]])
    rgb_path = tmp_path / "mask_rgb.bmp"
    Image.fromarray(np.stack([np.array([[0, 255]], np.uint8)] * 3, axis=-1)).save(rgb_path)
    np.testing.assert_array_equal(load_mask(rgb_path), [[0, 1]])


def test_unreadable_mask(tmp_path: Path) -> None:
    write_pair(tmp_path / "a.png", tmp_path / "a_mask.png")
    (tmp_path / "a_mask.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="cannot read mask") as error:
        load_mask(tmp_path / "a_mask.png")
    _assert_names(error, tmp_path / "a_mask.png")


def test_unknown_dataset_and_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="synthetic, isic2017, ph2, folder"):
        build_datasets("imagenet", None, split="default", image_size=8)
    with pytest.raises(DataError, match="official, alom, all"):
        build_datasets("isic2017", tmp_path, split="random", image_size=8)


def test_root_problems(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs a root folder"):
        build_datasets("ph2", None, split="default", image_size=8)
    with pytest.raises(DataError, match="does not exist") as error:
        build_datasets("folder", tmp_path / "nowhere", split="default", image_size=8)
    _assert_names(error, tmp_path / "nowhere")
    with pytest.raises(DataError, match="drop the root"):
        build_datasets("synthetic", tmp_path, split="default", image_size=8)


def test_unwritable_cache(tmp_path: Path) -> None:
    make_folder_tree(tmp_path, 1)
    blocker = tmp_path / "cache_is_a_file"
    blocker.write_text("")
    dataset = build_datasets("folder", tmp_path, split="all", image_size=8, cache_dir=blocker)["all"]
    with pytest.raises(DataError, match="R2UNET_FAST_CACHE") as error:
        dataset[0]
    _assert_names(error, blocker)


def test_label_masks_with_values_0_and_1_are_read_as_lesions(tmp_path):
    labels = np.zeros((6, 5), dtype=np.uint8)
    labels[2:4, 1:3] = 1
    Image.fromarray(labels).save(tmp_path / "labels.png")
    grey = labels * 100  # faint 0/100 mask: two values, so the higher one is lesion although it is below 127
    Image.fromarray(grey).save(tmp_path / "faint.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "labels.png"), labels)
    np.testing.assert_array_equal(load_mask(tmp_path / "faint.png"), labels)
