"""Thin wrappers over the C++ CPU kernels in ``r2unet_fast._C`` (``csrc/``).

Each wrapper allocates the outputs and lets the kernel fill them. The
signatures match the Triton launchers (:mod:`r2unet_fast.ops.triton`), so
:mod:`r2unet_fast.ops.autograd` drives either backend the same way.
Importing this module needs the built extension; dispatch checks that first.
"""
from __future__ import annotations

import torch

from .. import _C
from .reference import compute_dtype

NUM_SUMS = 5


def hybrid_loss_fwd(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image sums (I, P, T, B0, B1) of the hybrid loss, see :mod:`r2unet_fast.ops.triton.hybrid_loss`.

    Args:
        logits: (N, ...) fp32/bf16/fp16/fp64 CPU tensor, contiguous or channels_last.
        target: same shape and memory layout; dtype of ``logits`` or float32
            (float64 for float64 logits).
    Returns:
        (N, 5) float32 (float64 for float64 logits).
    """
    out = torch.empty((logits.shape[0], NUM_SUMS), dtype=compute_dtype(logits))
    _C.hybrid_loss_fwd(logits, target, out)
    return out


def hybrid_loss_bwd(logits: torch.Tensor, target: torch.Tensor, grad_sums: torch.Tensor,
                    grad_target: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The C++ twin of :func:`r2unet_fast.ops.triton.hybrid_loss.hybrid_loss_bwd` (same contract, CPU tensors)."""
    grad_logits = torch.empty_like(logits)
    grad_tgt = torch.empty_like(target) if grad_target else None
    _C.hybrid_loss_bwd(logits, target, grad_sums, grad_logits, grad_tgt)
    return grad_logits, grad_tgt
