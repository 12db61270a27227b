"""The paper's recurrent convolutional layer (Alom et al. 2018) with BatchNorm."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.dispatch import ensure_available


class RecurrentConv(nn.Module):
    """``s_0 = F = conv_f(x)``, ``s_k = F + conv_r(h_{k-1})``, ``h_k = relu(bn_k(s_k))``; returns ``h_t``.

    ``tied=True`` reuses ``conv_f``'s weight as ``conv_r`` (``s_k = conv_f(x + h_{k-1})``,
    the popular PyTorch R2U-Net); it needs ``in_ch == out_ch``. ``shared_norm=True``
    uses one BatchNorm for every step.

    Shapes: (N, in_ch, H, W) -> (N, out_ch, H, W).
    """

    def __init__(self, in_ch: int, out_ch: int, t: int = 2, tied: bool = False,
                 shared_norm: bool = False, backend: str = "auto") -> None:
        super().__init__()
        if t < 0:
            raise ValueError(f"t (recurrent steps) must be >= 0, got {t}")
        if tied and in_ch != out_ch:
            raise ValueError(f"tied=True reuses conv_f as conv_r and needs in_ch == out_ch, got {in_ch} and {out_ch}")
        self.t = t
        self.tied = tied
        self.backend = ensure_available(backend)
        self.conv_f = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=True)
        if not tied:
            self.conv_r = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norms = nn.ModuleList(nn.BatchNorm2d(out_ch) for _ in range(1 if shared_norm else t + 1))

    def _norm(self, k: int) -> nn.BatchNorm2d:
        return self.norms[min(k, len(self.norms) - 1)]

    @property
    def recurrent_weight(self) -> torch.Tensor:
        """The weight of ``conv_r`` (``conv_f``'s when tied): (out_ch, out_ch, 3, 3)."""
        return self.conv_f.weight if self.tied else self.conv_r.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = self.conv_f(x)
        h = torch.relu(self._norm(0)(feed))
        w_r = self.recurrent_weight
        for k in range(1, self.t + 1):
            # conv_f(x + h) == F + conv(h, W_f) without a second bias: one formula for tied and untied.
            h = torch.relu(self._norm(k)(feed + F.conv2d(h, w_r, padding=1)))
        return h

    def extra_repr(self) -> str:
        return f"t={self.t}, tied={self.tied}, shared_norm={len(self.norms) == 1}, backend={self.backend!r}"
