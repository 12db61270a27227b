"""Builders of small on-disk datasets for the data-layer tests (a plain module, not a conftest)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from r2unet_fast.data.isic2017 import ISIC2017_FOLDERS

REPO = Path(__file__).resolve().parents[1]


def ph2_root() -> Path | None:
    """The shared real PH2 folder ($R2UNET_FAST_PH2 or <repo>/../shared/data/ph2), or None when absent."""
    configured = os.environ.get("R2UNET_FAST_PH2")
    root = Path(configured) if configured else REPO.parent / "shared" / "data" / "ph2"
    return root if root.is_dir() else None


def rgb_array(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth-ish random uint8 (H, W, 3) picture (gradients + noise survive JPEG well)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(40, 200, 3)
    picture = base + 30 * np.sin(x / 3.0 + rng.uniform(0, 6))[..., None] + rng.normal(0, 8, (height, width, 3))
    return np.clip(picture, 0, 255).astype(np.uint8)


def mask_array(width: int, height: int, seed: int) -> np.ndarray:
    """A uint8 (H, W) 0/255 ellipse mask at a seed-dependent place."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    inside = ((y - cy) / (0.3 * height)) ** 2 + ((x - cx) / (0.3 * width)) ** 2 < 1
    return inside.astype(np.uint8) * 255


def encode(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    """Bytes of ``array`` saved in PIL format ``fmt`` (optionally converted to ``mode``)."""
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_pair(image_path: Path, mask_path: Path, size: tuple[int, int] = (20, 16), seed: int = 0) -> None:
    """Write an RGB image and its 0/255 mask (formats from the file extensions)."""
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb_array(*size, seed)).save(image_path)
    Image.fromarray(mask_array(*size, seed)).save(mask_path)


def make_isic_tree(
    root: Path, counts: dict[str, int], size: tuple[int, int] = (20, 16), superpixels: bool = True
) -> Path:
    """ISIC 2017 official layout with ``counts[part]`` images per part, plus csv and superpixel clutter.

    Files are written from a few pre-encoded byte strings so thousands of them take well under a second.
    """
    jpegs = [encode(rgb_array(*size, seed), "JPEG") for seed in range(4)]
    pngs = [encode(mask_array(*size, seed), "PNG") for seed in range(4)]
    superpixel_png = encode(rgb_array(*size, 99), "PNG")
    for part, count in counts.items():
        data_dir, truth_dir = (root / name for name in ISIC2017_FOLDERS[part])
        data_dir.mkdir(parents=True, exist_ok=True)
        truth_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / f"{data_dir.name}_metadata.csv").write_text("image_id,age_approximate,sex\n")
        for number in range(count):
            stem = isic_id(part, number)
            (data_dir / f"{stem}.jpg").write_bytes(jpegs[number % 4])
            if superpixels:
                (data_dir / f"{stem}_superpixels.png").write_bytes(superpixel_png)
            (truth_dir / f"{stem}_segmentation.png").write_bytes(pngs[number % 4])
    return root


def isic_id(part: str, number: int) -> str:
    """Distinct, realistic ISIC ids per part (ISIC_0000000 ...)."""
    offset = {"train": 0, "val": 100000, "test": 200000}[part]
    return f"ISIC_{offset + number:07d}"


def make_ph2_tree(root: Path, count: int, size: tuple[int, int] = (20, 16)) -> Path:
    """PH2 release layout with ``count`` cases under ``root/PH2 Dataset images``; returns that folder."""
    cases = root / "PH2 Dataset images"
    for number in range(count):
        case_id = f"IMD{number + 2:03d}"
        write_pair(
            cases / case_id / f"{case_id}_Dermoscopic_Image" / f"{case_id}.bmp",
            cases / case_id / f"{case_id}_lesion" / f"{case_id}_lesion.bmp",
            size,
            number,
        )
    return cases


def make_folder_tree(root: Path, count: int, size: tuple[int, int] = (20, 16), mask_suffix: str = "") -> Path:
    """``root/images/img_XX.png`` + ``root/masks/img_XX<mask_suffix>.png``; returns root."""
    for number in range(count):
        stem = f"img_{number:02d}"
        write_pair(root / "images" / f"{stem}.png", root / "masks" / f"{stem}{mask_suffix}.png", size, number)
    return root
