"""Model construction from a config or checkpoint, and batched prediction (optionally with flip TTA)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..nn import R2AttUNet
from .checkpoint import config_of, load_checkpoint
from .config import TrainConfig, UsageError
from .runtime import autocast


def build_model(config: TrainConfig) -> R2AttUNet:
    """The R2AttUNet a run trains (randomly initialised)."""
    return R2AttUNet(**config.model_kwargs())


def to_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move ``model`` to ``device`` in NHWC (channels_last): cuDNN and the Triton kernels prefer it,
    and on a CPU oneDNN's fast convolution kernels and the C++ weight gradient need it (the PH2
    recipe's step measured 1.13x faster than in NCHW)."""
    return model.to(device).to(memory_format=torch.channels_last)


def to_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A (N, 3, H, W) batch on ``device`` in the layout :func:`to_device` chose for the model."""
    return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def load_model(checkpoint: str | Path, device: torch.device,
               backend: str | None = None) -> tuple[R2AttUNet, TrainConfig, dict[str, Any]]:
    """The trained model (eval mode, on ``device``), its config and the checkpoint dict; a run folder
    means its best checkpoint."""
    state = load_checkpoint(checkpoint, name="best.pt")
    config = config_of(state)
    if backend is not None:
        config.backend = backend
    model = build_model(config)
    check_weights(state["model"], model.state_dict(), state["path"])
    model.load_state_dict(state["model"])
    return to_device(model, device).eval(), config, state


def check_weights(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: str) -> None:
    """UsageError naming the first layer where ``saved`` does not fit ``expected`` (missing, extra or of
    another shape), or the first tensor holding NaN or inf: such a model would predict garbage."""
    for name, want in expected.items():
        if name not in saved:
            raise UsageError(f"checkpoint {path} does not fit the model its config describes: it lacks {name} "
                             f"{tuple(want.shape)}")
        if tuple(saved[name].shape) != tuple(want.shape):
            raise UsageError(f"checkpoint {path} does not fit the model its config describes: {name} has shape "
                             f"{tuple(saved[name].shape)}, the model's is {tuple(want.shape)}")
    extra = [name for name in saved if name not in expected]
    if extra:
        raise UsageError(f"checkpoint {path} does not fit the model its config describes: it has {extra[0]}, "
                         f"which the model lacks ({len(extra)} such entries)")
    for name, tensor in saved.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UsageError(f"checkpoint {path} holds non-finite weights in {name} "
                             f"({int((~torch.isfinite(tensor)).sum())} of {tensor.numel()} values); "
                             "use an earlier checkpoint of the run")


@torch.no_grad()
def predict_probs(model: R2AttUNet, images: torch.Tensor, device: torch.device, amp: str = "off",
                  tta: bool = False) -> torch.Tensor:
    """Lesion probabilities float32 (N, 1, H, W) on CPU for a normalised batch (N, 3, H, W).

    ``tta`` averages the probabilities of the image and its horizontal and vertical flips.
    """
    x = to_input(images, device)
    flips: list[tuple[int, ...]] = [(), (3,), (2,)] if tta else [()]
    total = torch.zeros((x.shape[0], 1, *x.shape[2:]), dtype=torch.float32, device=device)
    for dims in flips:
        view = x.flip(dims) if dims else x
        with autocast(device, amp):
            logits = model(view)
        probs = torch.sigmoid(logits.float())
        total += probs.flip(dims) if dims else probs
    return (total / len(flips)).cpu()


def resize_probs(probs: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of one probability map (1, S, S) to float32 (height, width)."""
    if probs.shape[-2:] == (height, width):
        return probs.reshape(height, width).float()
    return F.interpolate(probs[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0, 0]
