"""Input validation shared by every op: clear ValueErrors before any kernel runs."""
from __future__ import annotations

import math

import torch


def check_floating(**tensors: torch.Tensor) -> None:
    """Every tensor must be a floating-point torch.Tensor."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; returns it."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"inputs must be on one device, got {listing}")
    return first


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """``t.shape`` must equal ``shape`` exactly."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    """``t`` must have ``ndim`` dims; ``layout`` names them for the message, e.g. "(N, C, H, W)"."""
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def check_finite_number(name: str, value: float, *, minimum: float | None = None) -> float:
    """A finite Python number (optionally >= minimum), returned as float."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (minimum is not None and v < minimum):
        bound = "" if minimum is None else f" and >= {minimum}"
        raise ValueError(f"{name} must be finite{bound}, got {value!r}")
    return v
