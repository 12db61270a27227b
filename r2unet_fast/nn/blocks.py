"""The four encoder/decoder blocks of Alom et al.: U-Net, ResU-Net, RU-Net and R2U-Net."""
from __future__ import annotations

import torch
import torch.nn as nn

from .recurrent import RecurrentConv

BLOCKS: tuple[str, ...] = ("conv", "residual", "recurrent", "r2")


class ConvBNReLU(nn.Sequential):
    """3x3 conv (with bias) + BatchNorm + ReLU: (N, in_ch, H, W) -> (N, out_ch, H, W)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=True), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class ConvBlock(nn.Sequential):
    """U-Net block: (3x3 conv + BN + ReLU) x 2."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(ConvBNReLU(in_ch, out_ch), ConvBNReLU(out_ch, out_ch))


class ResidualBlock(nn.Module):
    """ResU-Net block: ``x0 = conv1x1(x)``, returns ``x0 + ConvBlock(x0)``."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1x1 = nn.Conv2d(in_ch, out_ch, 1)
        self.body = ConvBlock(out_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.conv1x1(x)
        return x0 + self.body(x0)


class RRCUBlock(nn.Module):
    """Recurrent residual convolutional unit: ``x0 = conv1x1(x)``; ``y = rc2(rc1(x0))``; returns ``x0 + y``.

    ``residual=False`` drops the skip and gives the RU-Net block.
    Shapes: (N, in_ch, H, W) -> (N, out_ch, H, W).
    """

    def __init__(self, in_ch: int, out_ch: int, t: int = 2, *, tied: bool = False, shared_norm: bool = False,
                 residual: bool = True, backend: str = "auto") -> None:
        super().__init__()
        self.residual = residual
        self.conv1x1 = nn.Conv2d(in_ch, out_ch, 1)
        self.rc1 = RecurrentConv(out_ch, out_ch, t, tied=tied, shared_norm=shared_norm, backend=backend)
        self.rc2 = RecurrentConv(out_ch, out_ch, t, tied=tied, shared_norm=shared_norm, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.conv1x1(x)
        # the skip is added in rc2's last fused pass
        return self.rc2(self.rc1(x0), residual=x0 if self.residual else None)


def make_block(kind: str, in_ch: int, out_ch: int, *, t: int = 2, tied: bool = False,
               shared_norm: bool = False, backend: str = "auto") -> nn.Module:
    """Block ``kind`` in :data:`BLOCKS` mapping in_ch to out_ch channels."""
    if kind == "conv":
        return ConvBlock(in_ch, out_ch)
    if kind == "residual":
        return ResidualBlock(in_ch, out_ch)
    if kind in ("recurrent", "r2"):
        return RRCUBlock(in_ch, out_ch, t, tied=tied, shared_norm=shared_norm, residual=kind == "r2", backend=backend)
    raise ValueError(f"unknown block {kind!r}; choose one of {', '.join(BLOCKS)}")
