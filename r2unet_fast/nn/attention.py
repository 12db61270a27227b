"""Additive attention gate (Oktay et al. 2018) over the fused ``attention_gate`` op."""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import ops
from ..ops.dispatch import ensure_available, resolve


def _fold_bn(weight: torch.Tensor, bias: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN after a 1x1 conv, folded into it: weight (F, C), bias (F,)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return weight * scale[:, None], (bias - bn.running_mean) * scale + bn.bias


class AttentionGate(nn.Module):
    """``psi = sigmoid(w_psi . relu(W_x x + W_g g + b) + b_psi)``; returns ``x * psi``.

    ``norm=False``: W_x without bias (it would duplicate b). ``norm=True``: the
    MONAI / popular-PyTorch variant, each 1x1 conv with bias and BatchNorm; in eval
    mode the norms fold exactly into the fused op's weights.

    Shapes: x (N, x_ch, H, W), g (N, g_ch, H, W) -> (N, x_ch, H, W) [, psi (N, 1, H, W)].
    """

    fused_op = "attention_gate"

    def __init__(self, x_ch: int, g_ch: int, inter_ch: int, norm: bool = False, backend: str = "auto") -> None:
        super().__init__()
        self.norm = norm
        self.backend = ensure_available(backend)
        if norm:
            self.w_x = nn.Sequential(nn.Conv2d(x_ch, inter_ch, 1, bias=True), nn.BatchNorm2d(inter_ch))
            self.w_g = nn.Sequential(nn.Conv2d(g_ch, inter_ch, 1, bias=True), nn.BatchNorm2d(inter_ch))
            self.psi = nn.Sequential(nn.Conv2d(inter_ch, 1, 1, bias=True), nn.BatchNorm2d(1))
        else:
            self.w_x = nn.Conv2d(x_ch, inter_ch, 1, bias=False)
            self.w_g = nn.Conv2d(g_ch, inter_ch, 1, bias=True)
            self.psi = nn.Conv2d(inter_ch, 1, 1, bias=True)

    def fused_weights(self) -> tuple[torch.Tensor, ...]:
        """(w_x (F, Cx), w_g (F, Cg), bias (F,), w_psi (F,), b_psi (1,)) for the op; BN folded when norm."""
        if not self.norm:
            f = self.w_x.out_channels
            return (self.w_x.weight.reshape(f, -1), self.w_g.weight.reshape(f, -1), self.w_g.bias,
                    self.psi.weight.reshape(f), self.psi.bias)
        (cx, bnx), (cg, bng), (cp, bnp) = self.w_x, self.w_g, self.psi
        wx, bx = _fold_bn(cx.weight.flatten(1), cx.bias, bnx)
        wg, bg = _fold_bn(cg.weight.flatten(1), cg.bias, bng)
        wp, bp = _fold_bn(cp.weight.flatten(1), cp.bias, bnp)
        return wx, wg, bx + bg, wp.reshape(-1), bp

    def runs_on(self) -> str:
        """The backend the next forward runs, with the reason when that is not ``self.backend``."""
        if self.norm and self.training and self.backend != "reference":
            return ("reference (norm=True in training mode: the BatchNorm after psi needs the batch "
                    "statistics of the gate's pre-activation, which the fused op does not produce)")
        if self.backend == "auto":
            return resolve(self.fused_op, "auto", next(self.parameters()).device)
        return self.backend

    def extra_repr(self) -> str:
        return f"norm={self.norm}, runs_on={self.runs_on()!r}"

    def forward(self, x: torch.Tensor, g: torch.Tensor,
                return_psi: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.norm and self.training:
            # runs_on() says why this stays on the reference
            psi = torch.sigmoid(self.psi(torch.relu(self.w_x(x) + self.w_g(g))))
            out = x * psi
            return (out, psi) if return_psi else out
        return ops.attention_gate(x, g, *self.fused_weights(), return_psi=return_psi, backend=self.backend)
