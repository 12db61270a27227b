"""Seeding, joint image/mask augmentation and tensor conversion."""

from __future__ import annotations

import os
import random

import cv2
import numpy as np
import torch

# Importing albumentations otherwise queries PyPI (2 s timeout plus a warning on offline
# machines, again in every spawned DataLoader worker).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402

IMAGE_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGE_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_MEAN = np.asarray(IMAGE_MEAN, np.float32)
_STD = np.asarray(IMAGE_STD, np.float32)

# Distinct first words keep the random streams of different purposes independent.
AUGMENT_STREAM = 0xA0A0
SYNTHETIC_STREAM = 0x5E5E


def seed_sequence(*parts: int) -> np.random.SeedSequence:
    """A SeedSequence from arbitrary (even negative) integers."""
    return np.random.SeedSequence([int(part) % 2**64 for part in parts])


def make_rng(*parts: int) -> np.random.Generator:
    """A numpy Generator that depends only on ``parts``."""
    return np.random.default_rng(seed_sequence(*parts))


def build_augmentation() -> A.Compose:
    """Geometric + colour augmentation applied jointly to image and mask.

    Masks use nearest-neighbour interpolation in every geometric transform, so they stay binary.
    """
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.Affine(
                scale=(0.85, 1.15),
                rotate=(-20, 20),
                border_mode=cv2.BORDER_REFLECT_101,
                mask_interpolation=cv2.INTER_NEAREST,
                p=0.7,
            ),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.04, p=0.8),
        ]
    )


class Augmenter:
    """Deterministic augmentation: the output depends only on the input and the seed parts."""

    def __init__(self) -> None:
        self.compose = build_augmentation()

    def __call__(self, image: np.ndarray, mask: np.ndarray, *seed_parts: int) -> tuple[np.ndarray, np.ndarray]:
        """Augment uint8 (S, S, 3) image and uint8 (S, S) {0,1} mask; same shapes and dtypes out."""
        sequence = seed_sequence(AUGMENT_STREAM, *seed_parts)
        py_seed = int(sequence.generate_state(1, np.uint64)[0])
        # One shared generator pair, not Compose.set_random_seed: that seeds every transform
        # with the same value, so e.g. the horizontal and vertical flips always fire together.
        self.compose.set_random_state(np.random.default_rng(sequence), random.Random(py_seed))
        out = self.compose(image=image, mask=mask)
        return out["image"], out["mask"]


def normalize(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W) normalised with IMAGE_MEAN / IMAGE_STD (the model's input)."""
    normalised = (image.astype(np.float32) / 255.0 - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


def to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (S, S, 3) RGB and uint8 (S, S) {0,1} -> float32 (3, S, S) normalised and float32 (1, S, S)."""
    return normalize(image), torch.from_numpy(mask.astype(np.float32)[None])


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Undo :func:`normalize`: float (3, H, W) or (B, 3, H, W) -> uint8 (H, W, 3) or (B, H, W, 3) RGB."""
    channels_last = image.detach().float().cpu().movedim(-3, -1).numpy()
    return np.clip((channels_last * _STD + _MEAN) * 255.0 + 0.5, 0, 255).astype(np.uint8)
