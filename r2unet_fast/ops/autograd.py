"""``torch.autograd.Function`` of each fused op, parameterised by backend.

A backend is a module of launchers with one signature for every device
(``r2unet_fast.ops.triton.<op>`` for Triton, ``r2unet_fast.ops.cpu`` for
C++). The functions registered in :mod:`r2unet_fast.ops.dispatch` take the
reference's signature exactly.

Hybrid loss: the Function returns five per-image sums and its backward maps
their gradient to per-pixel gradients in one pass. Everything between the
sums and the scalar loss (``pos_weight``, the Dice and BCE weights, per-image
or pooled Dice, ``grad_output``) is the reference's own
:func:`~r2unet_fast.ops.reference.loss_from_sums` on (N,)-sized tensors, so
autograd derives the per-image coefficients and no loss formula is written
twice.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from .reference import compute_dtype, loss_from_sums

_LAUNCHERS: dict[str, dict[str, str]] = {
    "hybrid_loss": {"triton": "r2unet_fast.ops.triton.hybrid_loss", "cpu": "r2unet_fast.ops.cpu"},
}


@functools.lru_cache(maxsize=None)
def _launchers(op: str, backend: str) -> ModuleType:
    return importlib.import_module(_LAUNCHERS[op][backend])


def _kernel_layout(t: torch.Tensor) -> torch.memory_format:
    """A memory format ``t`` already has that keeps each image one dense block."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def prepare_hybrid_loss_inputs(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and target as the kernels read them, copying only what must change.

    The kernels walk each image's elements in memory order, so both tensors
    need one layout with the batch outermost: ``logits`` keeps contiguous or
    channels_last, anything else is made contiguous, and ``target`` follows
    ``logits``. The target keeps its dtype if it is the logits dtype or the
    compute dtype, else it is cast to the compute dtype (as the reference
    does). Copies are ordinary autograd ops, so gradients flow back to the
    caller's tensors in their own layout.
    """
    fmt = _kernel_layout(logits)
    x = logits.contiguous(memory_format=fmt)
    compute = compute_dtype(logits)
    if target.dtype not in (logits.dtype, compute):
        return x, target.to(dtype=compute, memory_format=fmt)
    return x, target.contiguous(memory_format=fmt)


def combine_sums(sums: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """(N, 5) kernel sums (I, P, T, B0, B1) -> the reference's (N, 4) (I, P, T, B0 + pos_weight * B1)."""
    bce = sums[:, 3:4].add(sums[:, 4:5], alpha=pos_weight)
    return torch.cat((sums[:, :3], bce), dim=1)


class HybridLossSums(torch.autograd.Function):
    """(logits, target, backend) -> (N, 5) per-image sums (I, P, T, B0, B1).

    Inputs must already be in kernel layout (:func:`prepare_hybrid_loss_inputs`).
    Backward reads logits and target once and writes grad_logits (and
    grad_target when the target requires grad) once.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, backend: str) -> torch.Tensor:
        sums = _launchers("hybrid_loss", backend).hybrid_loss_fwd(logits, target)
        ctx.save_for_backward(logits, target)
        ctx.backend = backend
        return sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sums: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        logits, target = ctx.saved_tensors
        need_logits, need_target = ctx.needs_input_grad[:2]
        # autograd may hand over an expanded (stride-0) or differently typed gradient
        grad_sums = grad_sums.to(dtype=compute_dtype(logits)).contiguous()
        grad_logits, grad_target = _launchers("hybrid_loss", ctx.backend).hybrid_loss_bwd(
            logits, target, grad_sums, need_target)
        return (grad_logits if need_logits else None), grad_target, None


def _hybrid_loss(backend: str, logits: torch.Tensor, target: torch.Tensor, *, dice_weight: float,
                 bce_weight: float, pos_weight: float, smooth: float, per_image: bool) -> torch.Tensor:
    x, t = prepare_hybrid_loss_inputs(logits, target)
    sums = HybridLossSums.apply(x, t, backend)
    return loss_from_sums(combine_sums(sums, pos_weight), logits.numel(), dice_weight=dice_weight,
                          bce_weight=bce_weight, smooth=smooth, per_image=per_image)


def hybrid_loss_triton(logits: torch.Tensor, target: torch.Tensor, *, dice_weight: float = 0.5,
                       bce_weight: float = 0.5, pos_weight: float = 1.0, smooth: float = 1.0,
                       per_image: bool = True) -> torch.Tensor:
    """:func:`r2unet_fast.ops.reference.hybrid_loss` on the Triton kernels.

    Args:
        logits: (N, 1, H, W) (any (N, ...)), fp32/bf16/fp16/fp64, CUDA (or CPU
            under ``TRITON_INTERPRET=1``), any memory layout.
        target: same shape, values in [0, 1], any float dtype.
    Returns:
        0-d tensor, float32 (float64 for float64 logits).
    """
    return _hybrid_loss("triton", logits, target, dice_weight=dice_weight, bce_weight=bce_weight,
                        pos_weight=pos_weight, smooth=smooth, per_image=per_image)


def hybrid_loss_cpu(logits: torch.Tensor, target: torch.Tensor, *, dice_weight: float = 0.5,
                    bce_weight: float = 0.5, pos_weight: float = 1.0, smooth: float = 1.0,
                    per_image: bool = True) -> torch.Tensor:
    """:func:`r2unet_fast.ops.reference.hybrid_loss` on the C++ kernels (CPU tensors).

    Args and return as :func:`hybrid_loss_triton`, for CPU tensors.
    """
    return _hybrid_loss("cpu", logits, target, dice_weight=dice_weight, bce_weight=bce_weight,
                        pos_weight=pos_weight, smooth=smooth, per_image=per_image)
