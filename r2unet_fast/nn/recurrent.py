"""The paper's recurrent convolutional layer (Alom et al. 2018) with BatchNorm."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops.dispatch import ensure_available, resolve


def unfusable_norms(norms: Iterable[nn.Module], noun: str) -> str | None:
    """Why the fused ``recurrent_conv`` op cannot run these BatchNorms (called ``noun`` in the
    reason), or None: it needs plain ``nn.BatchNorm2d`` with affine parameters and running statistics."""
    for norm in norms:
        if type(norm) is not nn.BatchNorm2d:
            return f"{type(norm).__name__} {noun} (statistics shared across processes)"
        if not (norm.affine and norm.track_running_stats):
            return "BatchNorm without affine parameters or running statistics"
    return None


def fused_runs_on(layer: nn.Module, device: torch.device) -> str:
    """What a layer with ``backend``, ``fused_op`` and ``_unfusable()`` runs next on ``device``:
    its backend, or ``"reference (<why>)"``."""
    if layer.backend == "reference":
        return "reference"
    reason = layer._unfusable()
    if reason is not None:
        return f"reference ({reason})"
    return resolve(layer.fused_op, layer.backend, device)


class RecurrentConv(nn.Module):
    """``s_0 = F = conv_f(x)``, ``s_k = F + conv_r(h_{k-1})``, ``h_k = relu(bn_k(s_k))``; returns ``h_t``.

    ``tied=True`` reuses ``conv_f``'s weight as ``conv_r`` (``s_k = conv_f(x + h_{k-1})``,
    the popular PyTorch R2U-Net); it needs ``in_ch == out_ch``. ``shared_norm=True``
    uses one BatchNorm for every step.

    The fused ``recurrent_conv`` op runs it (``backend``, see :meth:`runs_on`); BatchNorm layers
    replaced by synchronised ones (``--sync-bn``) keep it on the reference.

    Shapes: (N, in_ch, H, W) -> (N, out_ch, H, W).
    """

    fused_op = "recurrent_conv"

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

    def _unfusable(self) -> str | None:
        """Why the fused op cannot run these norms, or None."""
        reason = unfusable_norms(self.norms, "norms")
        if reason is not None:
            return reason
        first = self.norms[0]
        if any(n.eps != first.eps or n.momentum != first.momentum for n in self.norms):
            return "BatchNorms with different eps or momentum"
        return None

    def runs_on(self) -> str:
        """The backend the next forward runs, with the reason when that is not ``self.backend``."""
        return fused_runs_on(self, self.conv_f.weight.device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``h_t`` (+ ``residual``, the RRCU block's skip, added in the fused op's last pass)."""
        if self.backend == "reference" or self._unfusable() is not None:
            h = self._reference_forward(x)
            return h if residual is None else residual + h
        norms = list(self.norms)
        return ops.recurrent_conv(
            x, self.conv_f.weight, self.conv_f.bias, self.recurrent_weight, [n.weight for n in norms],
            [n.bias for n in norms], [n.running_mean for n in norms], [n.running_var for n in norms],
            [n.num_batches_tracked for n in norms], t=self.t, training=self.training, momentum=norms[0].momentum,
            eps=norms[0].eps, residual=residual, backend=self.backend)

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = self.conv_f(x)
        h = torch.relu(self._norm(0)(feed))
        w_r = self.recurrent_weight
        for k in range(1, self.t + 1):
            # conv_f(x + h) == F + conv(h, W_f) without a second bias: one formula for tied and untied.
            h = torch.relu(self._norm(k)(feed + F.conv2d(h, w_r, padding=1)))
        return h

    def extra_repr(self) -> str:
        return f"t={self.t}, tied={self.tied}, shared_norm={len(self.norms) == 1}, runs_on={self.runs_on()!r}"
