"""Reading a mask picture the way its author meant it: lesion or not, per pixel.

Masks come as 0/255 greys, 0/1 label maps, red-on-black drawings, palette PNGs,
16-bit TIFFs, transparent overlays... A single grey-level threshold reads some of
those as empty (pure red is grey level 76), and a model trained on empty masks
learns to predict nothing while every step "succeeds". The rule here:

1. A mask with exactly two distinct pixel values is a binary label map: the higher
   one (largest channel sum, alpha included) is lesion, whatever the two values are
   (0/1, 0/100, black/red, transparent/opaque).
2. Otherwise (anti-aliased or JPEG-compressed masks) a pixel is lesion when any
   colour channel is above half of its range; a transparent pixel (alpha at or below
   half range) is background whatever its colour.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Modes whose last band is alpha; "P" with transparency is converted to RGBA first.
_ALPHA_MODES = frozenset({"LA", "La", "RGBA", "RGBa", "PA"})
# Modes PIL can only meaningfully read as RGB colours.
_CONVERT_TO_RGB = frozenset({"CMYK", "YCbCr", "LAB", "HSV"})


def _half_range(mode: str, values: np.ndarray) -> float:
    """Half the value range of a channel in ``mode``; above it a channel counts as "on"."""
    if mode.startswith("I;16"):
        return 65535 / 2
    if mode in ("I", "F"):
        # 32-bit ints and floats carry no declared range: take the smallest common one that holds the data.
        top = float(values.max(initial=0))
        for full in (1.0, 255.0, 65535.0):
            if top <= full:
                return full / 2
        return float(2**31 - 1) / 2
    return 255 / 2


def _channels(mask: Image.Image) -> tuple[np.ndarray, str]:
    """The pixel values as (H, W, C) (alpha last when present) and the mode they are in."""
    if mask.mode == "P":
        mask = mask.convert("RGBA" if "transparency" in mask.info else "RGB")
    elif mask.mode in _CONVERT_TO_RGB:
        mask = mask.convert("RGB")
    elif mask.mode == "PA":
        mask = mask.convert("RGBA")
    values = np.asarray(mask)
    return (values[..., None] if values.ndim == 2 else values), mask.mode


def _two_values(flat: np.ndarray) -> tuple[int, int] | None:
    """Indices of one pixel of each value when ``flat`` (N, C) holds exactly two distinct values, else None.

    Linear-time (no np.unique sort), since full-size dermoscopy masks have tens of millions of pixels.
    """
    differs = np.any(flat != flat[0], axis=1)
    other = int(np.argmax(differs))
    if not differs[other]:
        return None  # one value only
    second = np.any(flat != flat[other], axis=1)
    return (0, other) if not np.any(differs & second) else None


def binarize_mask(mask: Image.Image) -> np.ndarray:
    """uint8 (H, W) in {0, 1}: 1 where the mask marks lesion (rules in the module docstring)."""
    if mask.mode == "1":
        return np.asarray(mask, dtype=np.uint8)
    values, mode = _channels(mask)
    height, width, count = values.shape
    flat = values.reshape(-1, count)
    if flat.shape[0]:
        pair = _two_values(flat)
        if pair is not None:
            sums = [float(flat[index].astype(np.float64).sum()) for index in pair]
            if sums[0] != sums[1]:  # equal sums (say pure red vs pure green) have no "higher": use rule 2
                high = flat[pair[int(np.argmax(sums))]]
                return np.all(values == high, axis=2).astype(np.uint8)
    has_alpha = mode in _ALPHA_MODES
    colour = values[..., :-1] if has_alpha else values
    lesion = np.any(colour > _half_range(mode, colour), axis=2)
    if has_alpha:
        lesion &= values[..., -1] > _half_range(mode, values[..., -1])
    return lesion.astype(np.uint8)
