"""``r2unet_fast::hybrid_loss_<backend>`` (triton, cpu) and the functions that call them.

Forward op: ``(logits, target, pos_weight, dice_weight, bce_weight, smooth, per_image) ->
(loss, coef)``, where ``coef`` (N, 5) is the loss's gradient with respect to each image's
five sums at grad_output 1 (see :mod:`r2unet_fast.ops.triton.hybrid_loss`). It is saved for
the backward op ``(logits, target, coef, grad_loss, grad_target) -> (grad_logits,
grad_target)``, which scales it by ``grad_loss`` on the device: no host sync anywhere.

:func:`hybrid_loss_triton` and :func:`hybrid_loss_cpu` take the reference's signature and are
what :mod:`r2unet_fast.ops.dispatch` runs. They are plain traceable Python: torch.compile
records one op call, and the only untraceable step, registering the ops on first use, is
a constant to dynamo (:func:`r2unet_fast.ops.library.ready`).
"""
from __future__ import annotations

import importlib

import torch

from ..reference import compute_dtype
from . import NAMESPACE, define_with_autograd, dense_layout, ready

NUM_SUMS = 5
_LAUNCHERS: dict[str, str] = {"triton": "r2unet_fast.ops.triton.hybrid_loss", "cpu": "r2unet_fast.ops.cpu"}
_REGISTERED: set[str] = set()


def op_name(backend: str, backward: bool = False) -> str:
    """``hybrid_loss_<backend>`` or ``hybrid_loss_<backend>_bwd`` (in namespace r2unet_fast)."""
    return f"hybrid_loss_{backend}" + ("_bwd" if backward else "")


def _fake_fwd(logits: torch.Tensor, target: torch.Tensor, pos_weight: float, dice_weight: float,
              bce_weight: float, smooth: float, per_image: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = compute_dtype(logits)
    return logits.new_empty((), dtype=dtype), logits.new_empty((logits.shape[0], NUM_SUMS), dtype=dtype)


def _fake_bwd(logits: torch.Tensor, target: torch.Tensor, coef: torch.Tensor, grad_loss: torch.Tensor,
              grad_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(logits), (torch.empty_like(target) if grad_target else target.new_empty(0))


def _setup_context(ctx, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, target = inputs[:2]
    coef = output[1]
    ctx.save_for_backward(logits, target, coef)
    ctx.mark_non_differentiable(coef)
    # coef never receives a gradient: do not let autograd fill one with zeros (a launch)
    ctx.set_materialize_grads(False)


def _backward_through(bwd_op):
    def backward(ctx, grad_loss: torch.Tensor | None, _grad_coef: None) -> tuple:
        need_logits, need_target = ctx.needs_input_grad[:2]
        if grad_loss is None or not (need_logits or need_target):
            return (None,) * 7
        logits, target, coef = ctx.saved_tensors
        grad_logits, grad_target = bwd_op(logits, target, coef, grad_loss, need_target)
        return (grad_logits if need_logits else None), (grad_target if need_target else None), *(None,) * 5
    return backward


def register(backend: str) -> None:
    """Define ``r2unet_fast::hybrid_loss_<backend>`` and its ``_bwd`` (once per process)."""
    if backend in _REGISTERED:
        return
    launchers = importlib.import_module(_LAUNCHERS[backend])
    define_with_autograd(op_name(backend), backend, launchers.hybrid_loss_fwd, _fake_fwd, launchers.hybrid_loss_bwd,
                         _fake_bwd, _backward_through, _setup_context)
    _REGISTERED.add(backend)


def prepare_inputs(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and target as the kernels read them, copying only what must change.

    The kernels walk each image's elements in memory order, so both tensors
    need one layout with the batch outermost: ``logits`` keeps contiguous or
    channels_last, anything else is made contiguous, and ``target`` follows
    ``logits``. The target keeps its dtype if it is the logits dtype or the
    compute dtype, else it is cast to the compute dtype (as the reference
    does). Copies are ordinary autograd ops, so gradients flow back to the
    caller's tensors in their own layout.
    """
    fmt = dense_layout(logits)
    x = logits.contiguous(memory_format=fmt)
    compute = compute_dtype(logits)
    if target.dtype not in (logits.dtype, compute):
        return x, target.to(dtype=compute, memory_format=fmt)
    return x, target.contiguous(memory_format=fmt)


def _hybrid_loss(backend: str, logits: torch.Tensor, target: torch.Tensor, *, dice_weight: float,
                 bce_weight: float, pos_weight: float, smooth: float, per_image: bool) -> torch.Tensor:
    ready("hybrid_loss", backend)
    x, t = prepare_inputs(logits, target)
    op = getattr(getattr(torch.ops, NAMESPACE), op_name(backend))
    loss, _ = op(x, t, float(pos_weight), float(dice_weight), float(bce_weight), float(smooth), bool(per_image))
    return loss


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
