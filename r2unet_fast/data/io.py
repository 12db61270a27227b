"""Reading and validating image/mask files.

Every failure caused by the user's files is raised as a one-line ``DataError``
that names the file and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
from PIL import Image

from .errors import DataError
from .masks import binarize_mask

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
EXTENSION_HINT = "png/bmp/jpg/tif/gif"
RGB_FIX = "convert it to 3-channel RGB or remove it"

# PIL raises a zoo of exception types for broken files (SyntaxError for some bad PNGs).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_GRAYSCALE_MODES = frozenset({"1", "L", "I", "F"})


def is_image_file(path: Path) -> bool:
    """True for a regular file whose extension is one of ``IMAGE_EXTENSIONS``."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _open(path: Path, what: str) -> Image.Image:
    """Open ``path`` lazily (PIL reads only the header here)."""
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist; add it or remove it from the list") from None
    except _DECODE_ERRORS as error:
        raise _unreadable(path, what, error) from error


def _unreadable(path: Path, what: str, error: BaseException) -> DataError:
    return DataError(
        f"cannot read {what} {path} ({type(error).__name__}: {error}); "
        f"replace it with a valid {EXTENSION_HINT} file or remove it"
    )


def _rgb_problem(image: Image.Image) -> str | None:
    """Why ``image`` cannot be used as an RGB photo, or None if it can."""
    mode = image.mode
    if mode in _GRAYSCALE_MODES or mode.startswith("I;"):
        return f"is grayscale (mode {mode})"
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return f"has transparency (mode {mode})"
    return None


def _check_rgb(image: Image.Image, path: Path) -> None:
    problem = _rgb_problem(image)
    if problem is not None:
        raise DataError(f"image {path} {problem}; {RGB_FIX}")


def image_size_of(path: Path) -> tuple[int, int]:
    """Validate an image's header (readable, RGB-convertible) and return its (width, height)."""
    with _open(path, "image") as image:
        _check_rgb(image, path)
        return image.size


def mask_size_of(path: Path) -> tuple[int, int]:
    """Validate a mask's header (readable) and return its (width, height)."""
    with _open(path, "mask") as mask:
        return mask.size


def _fmt(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def check_pair(image_path: Path, mask_path: Path | None) -> None:
    """Header-only validation of one sample: image mode, mask existence and matching size."""
    image_size = image_size_of(image_path)
    if mask_path is None:
        return
    if not mask_path.is_file():
        raise missing_mask(image_path, [mask_path])
    mask_size = mask_size_of(mask_path)
    if mask_size != image_size:
        raise DataError(
            f"mask {mask_path} is {_fmt(mask_size)} but its image {image_path} is {_fmt(image_size)}; "
            "resize the mask to its image (nearest neighbour) or fix the pairing"
        )


def missing_mask(image_path: Path, expected: list[Path]) -> DataError:
    """The error for an image whose mask is absent; ``expected`` lists accepted mask paths."""
    names = ", ".join(str(path) if i == 0 else path.name for i, path in enumerate(expected))
    return DataError(
        f"mask missing for image {image_path}: expected {names} ({EXTENSION_HINT}); "
        "add it or remove the image"
    )


def load_image(path: Path | str, *, draft_size: int | None = None) -> np.ndarray:
    """Decode an RGB image file.

    Returns a uint8 array of shape (H, W, 3). Palette images without transparency are
    converted silently; grayscale or transparent images raise ``DataError``.
    ``draft_size`` lets the JPEG decoder downscale by a power of two while keeping
    both sides >= draft_size, which makes huge photos much cheaper to read.
    """
    path = Path(path)
    with _open(path, "image") as image:
        _check_rgb(image, path)
        try:
            if draft_size is not None:
                image.draft("RGB", (draft_size, draft_size))
            return np.asarray(image.convert("RGB"))
        except _DECODE_ERRORS as error:
            raise _unreadable(path, "image", error) from error


def load_mask(path: Path | str) -> np.ndarray:
    """Decode a mask file as uint8 (H, W) with values {0, 1}.

    A two-valued mask marks lesion with its higher value (0/1 label maps, 0/255, black/red);
    any other mask marks it where a colour channel is above half range (see ``masks``).
    """
    path = Path(path)
    with _open(path, "mask") as mask:
        try:
            return binarize_mask(mask)
        except _DECODE_ERRORS as error:
            raise _unreadable(path, "mask", error) from error


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 (H, W, 3) to (size, size, 3): area when shrinking, bicubic when enlarging."""
    shrinking = image.shape[0] >= size and image.shape[1] >= size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interpolation)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 {0,1} (H, W) to (size, size) with nearest neighbour, staying in {0, 1}."""
    resized = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
    return (resized > 0).astype(np.uint8)


def decode_resized(image_path: Path, mask_path: Path | None, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode a sample and resize it: uint8 (S, S, 3) image and uint8 (S, S) {0,1} mask.

    A sample without a mask gets an all-zero mask.
    """
    image = resize_image(load_image(image_path, draft_size=size), size)
    if mask_path is None:
        return image, np.zeros((size, size), np.uint8)
    return image, resize_mask(load_mask(mask_path), size)


def index_by_stem(folder: Path, files: Iterable[Path] | None = None) -> dict[str, Path]:
    """Map file stem -> path for the image files in ``folder``; two files with one stem is an error."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir() if files is None else files):
        if not is_image_file(path):
            continue
        if path.stem in found:
            raise DataError(
                f"two files share the id {path.stem!r}: {found[path.stem]} and {path}; keep only one"
            )
        found[path.stem] = path
    return found


def find_mask(image_path: Path, masks: dict[str, Path], mask_dir: Path, suffixes: tuple[str, ...]) -> Path:
    """The mask for ``image_path`` among ``masks`` (stem -> path), named ``<stem><suffix>.<ext>``."""
    for suffix in suffixes:
        mask = masks.get(image_path.stem + suffix)
        if mask is not None:
            return mask
    raise missing_mask(image_path, [mask_dir / f"{image_path.stem}{suffix}.png" for suffix in suffixes])
