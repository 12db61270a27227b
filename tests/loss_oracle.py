"""The hybrid loss computed independently of the package: PyTorch's BCEWithLogitsLoss plus Dice by hand.

Both the reference and the fused kernels are checked against it, so a wrong term that they
share (they once shared ``loss_from_sums``) cannot pass unnoticed.
"""
from __future__ import annotations

import torch


def hand_hybrid_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 0.5, bce_weight: float = 0.5,
                     pos_weight: float = 1.0, smooth: float = 1.0, per_image: bool = True) -> torch.Tensor:
    """``bce_weight * BCEWithLogits(pos_weight) + dice_weight * (1 - Dice)`` of (N, ...) float64 tensors."""
    bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device))
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    if per_image:
        dice = ((2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()
    else:
        dice = (2 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)
    return bce_weight * bce(logits, target) + dice_weight * (1 - dice)
