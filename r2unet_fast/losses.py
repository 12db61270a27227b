"""Loss modules over the fused ops."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import ops
from .ops.dispatch import ensure_available

LOSSES: dict[str, tuple[float, float]] = {"hybrid": (0.5, 0.5), "bce": (0.0, 1.0), "dice": (1.0, 0.0)}


class HybridLoss(nn.Module):
    """``bce_weight * BCE(pos_weight) + dice_weight * (1 - Dice)`` of logits (docs/design.md section 2).

    Shapes: logits and target (N, 1, H, W) -> 0-d tensor.
    """

    fused_op = "hybrid_loss"

    def __init__(self, dice_weight: float = 0.5, bce_weight: float = 0.5, pos_weight: float = 1.0,
                 smooth: float = 1.0, per_image: bool = True, backend: str = "auto") -> None:
        super().__init__()
        self.dice_weight, self.bce_weight, self.pos_weight = float(dice_weight), float(bce_weight), float(pos_weight)
        self.smooth, self.per_image = float(smooth), bool(per_image)
        self.backend = ensure_available(backend)

    @classmethod
    def named(cls, name: str, **kwargs: float) -> "HybridLoss":
        """``"hybrid"`` (0.5/0.5 by default), ``"bce"`` or ``"dice"`` alone."""
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
        dice_weight, bce_weight = LOSSES[name]
        if name == "hybrid" and "dice_weight" in kwargs:
            dice_weight = float(kwargs.pop("dice_weight"))
            bce_weight = 1.0 - dice_weight
        kwargs.pop("dice_weight", None)
        return cls(dice_weight=dice_weight, bce_weight=bce_weight, **kwargs)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ops.hybrid_loss(logits, target, dice_weight=self.dice_weight, bce_weight=self.bce_weight,
                               pos_weight=self.pos_weight, smooth=self.smooth, per_image=self.per_image,
                               backend=self.backend)

    def extra_repr(self) -> str:
        return (f"dice_weight={self.dice_weight}, bce_weight={self.bce_weight}, pos_weight={self.pos_weight}, "
                f"smooth={self.smooth}, per_image={self.per_image}, backend={self.backend!r}")
