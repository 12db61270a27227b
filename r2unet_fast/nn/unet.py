"""R2U-Net with attention gates and the paper's three baselines (U-Net, ResU-Net, RU-Net)."""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ..ops.dispatch import ensure_available, has_kernel
from .attention import AttentionGate
from .blocks import ConvBNReLU, make_block


class UpConv(nn.Sequential):
    """Nearest 2x up-sample + 3x3 conv + BN + ReLU (a :class:`ConvBNReLU` on ``backend``):
    (N, in_ch, H, W) -> (N, out_ch, 2H, 2W)."""

    def __init__(self, in_ch: int, out_ch: int, backend: str = "auto") -> None:
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), ConvBNReLU(in_ch, out_ch, backend))


def set_backend(module: nn.Module, name: str) -> nn.Module:
    """Switch every submodule that has a ``backend`` to ``name``; returns ``module``.

    A layer whose fused op has no ``name`` kernel yet runs the reference, and a
    warning names those ops (see :func:`backend_report`): explicit, not silent.
    """
    ensure_available(name)
    missing = set()
    for m in module.modules():
        if hasattr(m, "backend"):
            op = getattr(m, "fused_op", None)
            if op is not None and not has_kernel(op, name):
                missing.add(op)
                m.backend = "reference"
            else:
                m.backend = name
    if missing:
        warnings.warn(f"no {name} kernel for {', '.join(sorted(missing))}: those layers run the reference backend",
                      stacklevel=2)
    return module


def backend_report(module: nn.Module) -> dict[str, str]:
    """``{qualified module name: backend}`` for every layer that dispatches a fused op; a layer that
    runs another backend in its current mode (``runs_on()``) says which and why."""
    return {name: m.runs_on() if hasattr(m, "runs_on") else m.backend for name, m in module.named_modules()
            if getattr(m, "fused_op", None) is not None}


class R2AttUNet(nn.Module):
    """Encoder of ``depth`` blocks (widths base*2^i, 2x2 max-pool between), decoder of
    up-convs, attention-gated skips, concatenation and blocks, 1x1 head to logits.

    ``block`` in conv / residual / recurrent / r2 gives U-Net / ResU-Net / RU-Net /
    R2U-Net; ``attention`` adds a gate on each skip. With ``tied=True, shared_norm=True,
    attention_norm=True`` the layers match the popular PyTorch implementation
    (LeeJunHyun/Image_Segmentation) parameter for parameter.

    Shapes: (N, in_channels, H, W) -> logits (N, out_channels, H, W); H and W must be
    divisible by 2^(depth-1).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1, base_channels: int = 64, depth: int = 5,
                 t: int = 2, block: str = "r2", attention: bool = True, tied: bool = False,
                 shared_norm: bool = False, attention_norm: bool = False, backend: str = "auto") -> None:
        super().__init__()
        for name, value, low in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                 ("base_channels", base_channels, 1), ("depth", depth, 2)):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.in_channels, self.out_channels, self.depth = in_channels, out_channels, depth
        self.backend = ensure_available(backend)
        widths = [base_channels * 2**i for i in range(depth)]
        opts = dict(t=t, tied=tied, shared_norm=shared_norm, backend=backend)
        self.encoder = nn.ModuleList(
            make_block(block, in_channels if i == 0 else widths[i - 1], widths[i], **opts) for i in range(depth))
        self.pool = nn.MaxPool2d(2)
        levels = list(reversed(range(depth - 1)))
        self.up = nn.ModuleList(UpConv(widths[i + 1], widths[i], backend) for i in levels)
        self.gates = nn.ModuleList(
            AttentionGate(widths[i], widths[i], max(1, widths[i] // 2), norm=attention_norm, backend=backend)
            for i in levels) if attention else None
        self.decoder = nn.ModuleList(make_block(block, 2 * widths[i], widths[i], **opts) for i in levels)
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this (2^(depth-1))."""
        return 2 ** (self.depth - 1)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError naming the problem (and the nearest valid size) for a bad input."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"input must be a 4-D tensor (N, {self.in_channels}, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"input has {x.shape[1]} channels, the model expects {self.in_channels}")
        m = self.size_multiple
        for axis, size in (("height", x.shape[2]), ("width", x.shape[3])):
            if size % m:
                nearest = max(m, round(size / m) * m)
                raise ValueError(f"input {axis} {size} is not divisible by {m} (depth {self.depth} halves it "
                                 f"{self.depth - 1} times); nearest valid size is {nearest}")

    def forward(self, x: torch.Tensor,
                return_attention: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (N, out_channels, H, W); with ``return_attention`` also the gates' psi maps,
        coarsest first, each (N, 1, h, w)."""
        self.check_input(x)
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(self.pool(x) if i else x)
            skips.append(x)
        d = skips.pop()
        maps: list[torch.Tensor] = []
        for j, (up, block) in enumerate(zip(self.up, self.decoder)):
            d = up(d)
            skip = skips.pop()
            if self.gates is not None:
                skip, psi = self.gates[j](skip, d, return_psi=True)
                maps.append(psi)
            d = block(torch.cat([skip, d], dim=1))
        logits = self.head(d)
        return (logits, maps) if return_attention else logits

    def set_backend(self, name: str) -> "R2AttUNet":
        """Switch every submodule to backend ``name`` ("auto", "reference", "triton", "cpu")."""
        return set_backend(self, name)

    def backend_report(self) -> dict[str, str]:
        """Which backend each fused-op layer runs (see :func:`backend_report`)."""
        return backend_report(self)


class R2UNet(R2AttUNet):
    """:class:`R2AttUNet` without attention gates (same arguments, ``attention`` fixed to False)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, base_channels: int = 64, depth: int = 5,
                 t: int = 2, block: str = "r2", tied: bool = False, shared_norm: bool = False,
                 backend: str = "auto") -> None:
        super().__init__(in_channels, out_channels, base_channels, depth, t, block, attention=False, tied=tied,
                         shared_norm=shared_norm, backend=backend)
