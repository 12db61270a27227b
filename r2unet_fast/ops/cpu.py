"""Launchers of the C++ CPU kernels in ``r2unet_fast._C`` (``csrc/``).

Each launcher allocates the outputs and lets the kernel fill them. The
signatures match the Triton launchers (:mod:`r2unet_fast.ops.triton`), and
:mod:`r2unet_fast.ops.library` registers both as ``r2unet_fast::<op>_<backend>``.
Importing this module needs the built extension; dispatch checks that first.
"""
from __future__ import annotations

import torch

from .. import _C
from .reference import compute_dtype

NUM_SUMS = 5


def hybrid_loss_fwd(logits: torch.Tensor, target: torch.Tensor, pos_weight: float, dice_weight: float,
                    bce_weight: float, smooth: float, per_image: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The hybrid loss and its gradient coefficients, see :mod:`r2unet_fast.ops.triton.hybrid_loss`.

    Args:
        logits: (N, ...) fp32/bf16/fp16/fp64 CPU tensor, contiguous or channels_last.
        target: same shape and memory layout; dtype of ``logits`` or float32
            (float64 for float64 logits).
    Returns:
        loss 0-d and coef (N, 5) (dLoss/dsums at grad_output 1), float32 (float64 for float64 logits).
    """
    dtype = compute_dtype(logits)
    loss = torch.empty((), dtype=dtype)
    coef = torch.empty((logits.shape[0], NUM_SUMS), dtype=dtype)
    _C.hybrid_loss_fwd(logits, target, loss, coef, pos_weight, dice_weight, bce_weight, smooth, per_image)
    return loss, coef


def hybrid_loss_bwd(logits: torch.Tensor, target: torch.Tensor, coef: torch.Tensor, grad_loss: torch.Tensor,
                    grad_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ twin of :func:`r2unet_fast.ops.triton.hybrid_loss.hybrid_loss_bwd` (same contract, CPU tensors)."""
    grad_logits = torch.empty_like(logits)
    grad_tgt = torch.empty_like(target) if grad_target else target.new_empty(0)
    _C.hybrid_loss_bwd(logits, target, coef, grad_loss, grad_logits, grad_tgt if grad_target else None)
    return grad_logits, grad_tgt


def hybrid_loss_epilogue(partials: torch.Tensor, numel: int, pos_weight: float, dice_weight: float,
                         bce_weight: float, smooth: float, per_image: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's epilogue alone, for tests: float64 partials (N, chunks, 5) -> loss 0-d and
    coef (N, 5) in float64 (:func:`r2unet_fast.ops.triton.hybrid_loss.hybrid_loss_epilogue`'s twin)."""
    loss = torch.empty((), dtype=torch.float64)
    coef = torch.empty((partials.shape[0], NUM_SUMS), dtype=torch.float64)
    _C.hybrid_loss_epilogue(partials, numel, loss, coef, pos_weight, dice_weight, bce_weight, smooth, per_image)
    return loss, coef
