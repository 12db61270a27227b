"""Procedural dermoscopy-like images with exact lesion masks (numpy only, a few ms each).

Each picture has a skin tone, an irregular pigmented lesion with variegated colour and a
soft border, hairs drawn over everything (not part of the mask), dermoscope vignetting,
mild blur and sensor noise. Geometry lives in [-1, 1] coordinates, so one seed gives the
same scene at every image size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .base import AugmentedItems
from .transforms import SYNTHETIC_STREAM, make_rng

_SKIN_TONES = np.array(
    [[240, 205, 180], [226, 176, 145], [196, 140, 105], [150, 100, 72], [105, 70, 50]], np.float32
)
# Light brown, brown, dark brown, black-brown, bluish-grey (regression/veil), reddish; browns dominate as in ISIC.
_LESION_COLOURS = np.array(
    [[178, 118, 82], [140, 86, 56], [96, 58, 40], [60, 40, 34], [104, 106, 122], [170, 100, 92]], np.float32
)
_LESION_WEIGHTS = np.array([0.24, 0.3, 0.2, 0.1, 0.1, 0.06])
_BOUNDARY_SAMPLES = 720


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1]: y (S, 1) and x (1, S), float32."""
    axis = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2.0 - 1.0
    return axis[:, None], axis[None, :]


def _upsample(coarse: np.ndarray, size: int) -> np.ndarray:
    """Smooth (smoothstep-weighted bilinear) upsampling of a (c, c) grid to (S, S)."""
    position = np.linspace(0.0, coarse.shape[0] - 1.0, size, dtype=np.float32)
    low = np.minimum(position.astype(np.int64), coarse.shape[0] - 2)
    frac = position - low
    frac = frac * frac * (3.0 - 2.0 * frac)
    rows = coarse[low] * (1.0 - frac[:, None]) + coarse[low + 1] * frac[:, None]
    return rows[:, low] * (1.0 - frac[None, :]) + rows[:, low + 1] * frac[None, :]


def _fractal_noise(rng: np.random.Generator, size: int, cells: tuple[int, ...]) -> np.ndarray:
    """Sum of smooth noise octaves, float32 (S, S), roughly zero-mean with unit range."""
    total = np.zeros((size, size), np.float32)
    for octave, count in enumerate(cells):
        coarse = rng.random((count + 1, count + 1), dtype=np.float32) - 0.5
        total += _upsample(coarse, size) * (0.55**octave)
    return total


def _skin(rng: np.random.Generator, size: int) -> np.ndarray:
    """Skin background, float32 (S, S, 3) in 0..255, with blotchy low-frequency tone variation."""
    position = rng.uniform(0.0, len(_SKIN_TONES) - 1.0)
    low = min(int(position), len(_SKIN_TONES) - 2)
    tone = _SKIN_TONES[low] + (position - low) * (_SKIN_TONES[low + 1] - _SKIN_TONES[low])
    tone = tone * (rng.uniform(0.93, 1.05) + rng.normal(0.0, 0.02, 3)).astype(np.float32)
    shade = 1.0 + 0.12 * _fractal_noise(rng, size, (2, 5))
    # Erythema only ever adds red; a symmetric term would tint the skin green.
    redness = rng.uniform(0.0, 40.0) * np.maximum(_fractal_noise(rng, size, (3,)), 0.0)
    skin = tone[None, None, :] * shade[..., None]
    skin[..., 0] += redness
    skin[..., 2] -= 0.5 * redness
    return skin


def _boundary(rng: np.random.Generator) -> np.ndarray:
    """Relative boundary radius per angle, float32 (_BOUNDARY_SAMPLES,), mean about 1."""
    theta = np.linspace(0.0, 2.0 * np.pi, _BOUNDARY_SAMPLES, endpoint=False, dtype=np.float32)
    irregularity = rng.uniform(0.08, 0.35)
    radius = np.ones_like(theta)
    for harmonic in range(2, 14):
        amplitude = irregularity * rng.uniform(0.2, 1.0) / harmonic**1.1
        radius += amplitude * np.cos(harmonic * theta + rng.uniform(0.0, 2.0 * np.pi))
    return np.maximum(radius, 0.35)


def _lesion_geometry(rng: np.random.Generator, size: int) -> tuple[np.ndarray, float]:
    """Normalised radius rho / R(theta), float32 (S, S) (< 1 inside), and the edge softness."""
    y, x = _grid(size)
    aspect = rng.uniform(0.6, 1.0)
    tilt = rng.uniform(0.0, np.pi)
    area_fraction = rng.uniform(0.08, 0.45)
    radius = np.sqrt(4.0 * area_fraction / (np.pi * aspect))
    reach = float(np.clip(1.0 - radius, 0.05, 0.3))
    centre_y, centre_x = rng.uniform(-reach, reach, 2)
    dy, dx = y - centre_y, x - centre_x
    u = dx * np.cos(tilt) + dy * np.sin(tilt)
    v = (dy * np.cos(tilt) - dx * np.sin(tilt)) / aspect
    angle_index = ((np.arctan2(v, u) + np.pi) * (_BOUNDARY_SAMPLES / (2.0 * np.pi))).astype(np.int64)
    boundary = _boundary(rng)[angle_index % _BOUNDARY_SAMPLES]
    relative = np.sqrt(u * u + v * v) / (radius * boundary)
    # Radial noise changes the area, so rescale once to land on the drawn size.
    achieved = max(float(np.mean(relative < 1.0)), 1.0 / size**2)
    relative *= np.sqrt(achieved / area_fraction)
    return relative.astype(np.float32), rng.uniform(0.04, 0.18)


def _pick_colour(rng: np.random.Generator) -> np.ndarray:
    colour = _LESION_COLOURS[rng.choice(len(_LESION_COLOURS), p=_LESION_WEIGHTS)]
    return colour + rng.normal(0.0, 8.0, 3).astype(np.float32)


def _wave_noise(rng: np.random.Generator, size: int, waves: int, wavelength: float) -> np.ndarray:
    """Isotropic quasi-random pattern, float32 (S, S), unit variance: a sum of plane waves in random directions.

    Unlike upsampled grid noise it has no axis-aligned artefacts; its zero crossings form
    closed, cell-like curves.
    """
    y, x = _grid(size)
    total = np.zeros((size, size), np.float32)
    for direction in rng.uniform(0.0, np.pi, waves):
        frequency = 2.0 * np.pi / (wavelength * rng.uniform(0.8, 1.25))
        along_x = frequency * np.cos(direction) * x
        along_y = frequency * np.sin(direction) * y + rng.uniform(0.0, 2.0 * np.pi)
        # cos(a + b) split into outer products keeps this O(S) trig calls.
        total += np.cos(along_y) * np.cos(along_x) - np.sin(along_y) * np.sin(along_x)
    return total * np.float32(np.sqrt(2.0 / waves))


def _dots(rng: np.random.Generator, size: int, relative: np.ndarray) -> np.ndarray:
    """Soft dots and globules inside the lesion, float32 (S, S) in [0, 1]."""
    candidates = rng.uniform(0.0, size - 1.0, (int(rng.integers(0, 60)), 2)).astype(np.float32)
    rows, cols = candidates.astype(np.int64).T
    inside = candidates[relative[rows, cols] < 0.85]
    coverage = np.zeros(size * size, np.float32)
    _splat(coverage, inside, size, rng.uniform(1.0, 2.5) * max(1.0, size / 128.0) ** 2)
    return np.minimum(_binomial_blur(coverage.reshape(size, size)), 1.0)


def _lesion_colour(rng: np.random.Generator, size: int, relative: np.ndarray) -> np.ndarray:
    """Variegated pigment, float32 (S, S, 3): blotches of two hues, darker centre, patchy network, dots."""
    first = _pick_colour(rng)
    second = first * rng.uniform(0.45, 0.8) if rng.random() < 0.65 else _pick_colour(rng)
    mix = np.clip(0.5 + 0.45 * _wave_noise(rng, size, 8, rng.uniform(0.5, 1.0)), 0.0, 1.0)
    colour = first + mix[..., None] * (second - first)
    network = np.exp(-np.square(_wave_noise(rng, size, 6, rng.uniform(0.1, 0.2)) / 0.4))
    patches = np.clip(0.5 + 2.5 * _fractal_noise(rng, size, (4,)), 0.0, 1.0)
    shade = (
        1.0
        - rng.uniform(0.0, 0.35) * np.clip(1.0 - relative, 0.0, 1.0)
        - rng.uniform(0.0, 0.25) * network * patches
        - rng.uniform(0.2, 0.6) * _dots(rng, size, relative)
    )
    return colour * shade[..., None]


def _blend_lesion(rng: np.random.Generator, skin: np.ndarray, relative: np.ndarray, softness: float) -> np.ndarray:
    """Lay the lesion over the skin with a soft border: nearly opaque inside, fading across the edge."""
    colour = _lesion_colour(rng, skin.shape[0], relative)
    inside = relative < 1.0
    # Pigmented lesions are darker than the skin around them, whatever tone was drawn for each.
    brightest = rng.uniform(0.4, 0.85) * float(skin[~inside].mean())
    colour *= min(1.0, brightest / float(colour[inside].mean()))
    alpha = np.clip((1.0 - relative) / softness + 0.5, 0.0, 1.0) * rng.uniform(0.8, 0.97)
    return skin + alpha[..., None] * (colour - skin)


def _hair_coverage(rng: np.random.Generator, size: int) -> np.ndarray:
    """Anti-aliased coverage, float32 (S, S) in [0, 1], of 0..several thin curved hairs."""
    count = int(rng.choice(9, p=[0.3, 0.15, 0.12, 0.1, 0.09, 0.08, 0.06, 0.05, 0.05]))
    coverage = np.zeros(size * size, np.float32)
    steps = 3 * size
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
    for _ in range(count):
        start, control, end = rng.uniform(-1.2, 1.2, (3, 2)).astype(np.float32)
        curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
        points = (curve + 1.0) * (size / 2.0) - 0.5
        length = float(np.sum(np.hypot(*np.diff(points, axis=0).T)))
        width = rng.uniform(0.6, 1.4) * max(1.0, size / 192.0)
        _splat(coverage, points, size, width * length / steps)
    return np.minimum(coverage.reshape(size, size), 1.0)


def _splat(coverage: np.ndarray, points: np.ndarray, size: int, weight: float) -> None:
    """Add ``weight`` per (y, x) point, split bilinearly over its 4 neighbour pixels, into flat ``coverage``."""
    base = np.floor(points)
    frac = points - base
    base = base.astype(np.int64)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        y, x = base[:, 0] + dy, base[:, 1] + dx
        share = (frac[:, 0] if dy else 1 - frac[:, 0]) * (frac[:, 1] if dx else 1 - frac[:, 1])
        inside = (y >= 0) & (y < size) & (x >= 0) & (x < size)
        coverage += np.bincount(
            y[inside] * size + x[inside], weights=share[inside] * weight, minlength=size * size
        ).astype(np.float32)


def _vignette(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dermoscope field of view, float32 (S, S): 1 inside the lens circle, near 0 in the corners."""
    y, x = _grid(size)
    distance = np.sqrt(y * y + x * x)
    lens = np.clip((rng.uniform(0.98, 1.35) - distance) / rng.uniform(0.04, 0.15), 0.0, 1.0)
    return lens * (1.0 - rng.uniform(0.05, 0.2) * distance**2)


def _binomial_blur(image: np.ndarray) -> np.ndarray:
    """3x3 binomial blur over the first two axes of a float32 (S, S) or (S, S, C) array."""
    pad = ((1, 1), (1, 1)) + ((0, 0),) * (image.ndim - 2)
    padded = np.pad(image, pad, mode="edge")
    rows = padded[:-2] * 0.25 + padded[1:-1] * 0.5 + padded[2:] * 0.25
    return rows[:, :-2] * 0.25 + rows[:, 1:-1] * 0.5 + rows[:, 2:] * 0.25


def _soften(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Mild optical blur (partially blended) plus Gaussian sensor noise."""
    softened = image + rng.uniform(0.3, 1.0) * (_binomial_blur(image) - image)
    return softened + rng.uniform(1.0, 4.0) * rng.standard_normal(image.shape, dtype=np.float32)


def render_lesion(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic dermoscopy picture: uint8 (S, S, 3) RGB and uint8 (S, S) {0,1} lesion mask."""
    relative, softness = _lesion_geometry(rng, size)
    image = _blend_lesion(rng, _skin(rng, size), relative, softness)
    hair = _hair_coverage(rng, size)[..., None]
    image += hair * (rng.uniform(15.0, 60.0) * np.array([1.0, 0.8, 0.7], np.float32) - image)
    lens = _vignette(rng, size)[..., None]
    image = image * lens + rng.uniform(4.0, 18.0) * (1.0 - lens)
    image = _soften(rng, image)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), (relative < 1.0).astype(np.uint8)


def synthetic_id(index: int) -> str:
    """The id (and file stem) of synthetic item ``index``."""
    return f"syn_{index:04d}"


class SyntheticLesions(AugmentedItems):
    """``n`` procedural images, each determined by (seed, index); items as in SegmentationDataset."""

    def __init__(self, n: int, image_size: int, seed: int, *, augment: bool = False) -> None:
        super().__init__(image_size, augment=augment, seed=seed)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Un-augmented uint8 (S, S, 3) image and uint8 (S, S) {0,1} mask of item ``index``."""
        return render_lesion(make_rng(SYNTHETIC_STREAM, self.seed, index), self.image_size)

    def image(self, index: int) -> np.ndarray:
        """uint8 (S, S, 3) RGB of item ``index``."""
        return self.render(index)[0]

    def mask(self, index: int) -> np.ndarray:
        """uint8 (S, S) {0,1} lesion mask of item ``index``."""
        return self.render(index)[1]

    def _arrays(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        image, mask = self.render(index)
        return image, mask, synthetic_id(index)


def write_synthetic_folder(root: Path, n: int, image_size: int, seed: int) -> Path:
    """Write ``root/images/syn_0000.png`` and ``root/masks/syn_0000.png`` (0/255) for n items; returns root."""
    root = Path(root)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    lesions = SyntheticLesions(n, image_size, seed)
    for index in range(n):
        image, mask = lesions.render(index)
        Image.fromarray(image).save(images / f"{synthetic_id(index)}.png")
        Image.fromarray(mask * np.uint8(255)).save(masks / f"{synthetic_id(index)}.png")
    return root
