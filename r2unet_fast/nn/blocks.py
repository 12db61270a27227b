"""The four encoder/decoder blocks of Alom et al.: U-Net, ResU-Net, RU-Net and R2U-Net."""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import ops
from ..ops.dispatch import ensure_available
from .recurrent import RecurrentConv, fused_runs_on, unfusable_norms

BLOCKS: tuple[str, ...] = ("conv", "residual", "recurrent", "r2")


class ConvBNReLU(nn.Sequential):
    """3x3 conv (with bias) + BatchNorm + ReLU: (N, in_ch, H, W) -> (N, out_ch, H, W).

    The recurrent unit with t = 0 (``relu(bn_0(conv_f(x)))``, no recurrent weight), so the fast
    backends run it on the fused ``recurrent_conv`` op (``backend``, see :meth:`runs_on`); a BatchNorm
    the op cannot run (synchronised by ``--sync-bn``, no affine parameters or running statistics)
    keeps it on the eager reference. Still an ``nn.Sequential`` of (conv, norm, relu), so its
    state_dict (``0.weight``, ``1.running_mean``, ...) is the same on every backend and old
    checkpoints load.
    """

    fused_op = "recurrent_conv"

    def __init__(self, in_ch: int, out_ch: int, backend: str = "auto") -> None:
        super().__init__(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=True), nn.BatchNorm2d(out_ch),
                         nn.ReLU(inplace=True))
        self.backend = ensure_available(backend)

    def _unfusable(self) -> str | None:
        """Why the fused op cannot run this BatchNorm, or None."""
        return unfusable_norms([self[1]], "norm")

    def runs_on(self) -> str:
        """The backend the next forward runs, with the reason when that is not ``self.backend``."""
        return fused_runs_on(self, self[0].weight.device)

    def extra_repr(self) -> str:
        return f"runs_on={self.runs_on()!r}"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``relu(bn(conv(x)))`` (+ ``residual``, the ResU-Net block's skip, added in the op's last pass)."""
        conv, norm = self[0], self[1]
        if self.backend == "reference" or self._unfusable() is not None:
            h = self[2](norm(conv(x)))
            return h if residual is None else residual + h
        return ops.recurrent_conv(
            x, conv.weight, conv.bias, None, [norm.weight], [norm.bias], [norm.running_mean], [norm.running_var],
            [norm.num_batches_tracked], t=0, training=self.training, momentum=norm.momentum, eps=norm.eps,
            residual=residual, backend=self.backend)


class ConvBlock(nn.Sequential):
    """U-Net block: (3x3 conv + BN + ReLU) x 2: (N, in_ch, H, W) -> (N, out_ch, H, W)."""

    def __init__(self, in_ch: int, out_ch: int, backend: str = "auto") -> None:
        super().__init__(ConvBNReLU(in_ch, out_ch, backend), ConvBNReLU(out_ch, out_ch, backend))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The two units (+ ``residual``, added in the second unit's fused pass)."""
        first, second = self
        return second(first(x), residual=residual)


class ResidualBlock(nn.Module):
    """ResU-Net block: ``x0 = conv1x1(x)``, returns ``x0 + ConvBlock(x0)``: (N, in_ch, H, W) -> (N, out_ch, H, W)."""

    def __init__(self, in_ch: int, out_ch: int, backend: str = "auto") -> None:
        super().__init__()
        self.conv1x1 = nn.Conv2d(in_ch, out_ch, 1)
        self.body = ConvBlock(out_ch, out_ch, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.conv1x1(x)
        # the skip is added in the body's last fused pass
        return self.body(x0, residual=x0)


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
        return ConvBlock(in_ch, out_ch, backend)
    if kind == "residual":
        return ResidualBlock(in_ch, out_ch, backend)
    if kind in ("recurrent", "r2"):
        return RRCUBlock(in_ch, out_ch, t, tied=tied, shared_norm=shared_norm, residual=kind == "r2", backend=backend)
    raise ValueError(f"unknown block {kind!r}; choose one of {', '.join(BLOCKS)}")
