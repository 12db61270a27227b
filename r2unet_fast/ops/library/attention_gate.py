"""``r2unet_fast::attention_gate_<backend>`` (triton, cpu) and the functions that call them.

Triton forward op: ``(x, g, w_x, w_g, bias, w_psi, b_psi) -> (out, psi)``. Nothing of the
forward but its inputs is saved: the backward op ``(x, g, w_x, w_g, bias, w_psi, b_psi,
grad_out, grad_psi) -> (dx, dg, dw_x, dw_g, dbias, dw_psi, db_psi)`` recomputes the
F-channel intermediate and psi (:mod:`r2unet_fast.ops.triton.attention_gate`): on a GPU the
bytes not stored are worth more than the GEMM work. The C++ ops keep that intermediate
instead (a third output ``kept``, a third less backward GEMM work; on a CPU the GEMMs decide
the time), and their backward takes it after ``b_psi``. ``grad_psi`` is an empty tensor when
psi got no gradient.

:func:`attention_gate_triton` and :func:`attention_gate_cpu` take the reference's signature
and are what :mod:`r2unet_fast.ops.dispatch` runs: they bring x and g into one memory format
and the weights into the compute dtype (ordinary autograd ops, so gradients reach the
caller's tensors in their own dtype and layout), then make one op call.
"""
from __future__ import annotations

import importlib

import torch

from ..reference import compute_dtype
from . import NAMESPACE, define, define_with_autograd, dense_layout, ready

_LAUNCHERS: dict[str, str] = {"triton": "r2unet_fast.ops.triton.attention_gate", "cpu": "r2unet_fast.ops.cpu"}
# backends whose forward keeps the pre-activation for backward (a third output)
_KEEPS: frozenset[str] = frozenset({"cpu"})
_REGISTERED: set[str] = set()
_NUM_INPUTS = 7


def op_name(backend: str, backward: bool = False, inference: bool = False) -> str:
    """``attention_gate_<backend>``, its ``_bwd``, or ``_infer`` (the keeping backends' forward without
    the kept buffer, for calls that need no gradient), in namespace r2unet_fast."""
    return f"attention_gate_{backend}" + ("_bwd" if backward else "") + ("_infer" if inference else "")


def _fake_fwd(x: torch.Tensor, g: torch.Tensor, w_x: torch.Tensor, w_g: torch.Tensor, bias: torch.Tensor,
              w_psi: torch.Tensor, b_psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, _, h, w = x.shape
    return torch.empty_like(x), x.new_empty((n, 1, h, w))


def _fake_fwd_kept(x: torch.Tensor, g: torch.Tensor, w_x: torch.Tensor, w_g: torch.Tensor, bias: torch.Tensor,
                   w_psi: torch.Tensor, b_psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..cpu import attention_gate_kept_numel

    n, _, h, w = x.shape
    kept = x.new_empty(attention_gate_kept_numel(n, h, w, w_x.shape[0]), dtype=compute_dtype(x))
    return (*_fake_fwd(x, g, w_x, w_g, bias, w_psi, b_psi), kept)


def _fake_bwd(x: torch.Tensor, g: torch.Tensor, w_x: torch.Tensor, w_g: torch.Tensor, bias: torch.Tensor,
              w_psi: torch.Tensor, b_psi: torch.Tensor, grad_out: torch.Tensor,
              grad_psi: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty_like(t) for t in (x, g, w_x, w_g, bias, w_psi, b_psi))


def _fake_bwd_kept(x: torch.Tensor, g: torch.Tensor, w_x: torch.Tensor, w_g: torch.Tensor, bias: torch.Tensor,
                   w_psi: torch.Tensor, b_psi: torch.Tensor, kept: torch.Tensor, grad_out: torch.Tensor,
                   grad_psi: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return _fake_bwd(x, g, w_x, w_g, bias, w_psi, b_psi, grad_out, grad_psi)


def _setup_context(ctx, inputs: tuple, output: tuple[torch.Tensor, ...]) -> None:
    kept = output[2:]  # () for a recomputing backend
    ctx.save_for_backward(*inputs, *kept)
    if kept:
        ctx.mark_non_differentiable(*kept)
    # an output that gets no gradient stays None instead of a zero-filled tensor (a launch)
    ctx.set_materialize_grads(False)


def _backward_through(bwd_op):
    def backward(ctx, grad_out: torch.Tensor | None, grad_psi: torch.Tensor | None, *_kept: None) -> tuple:
        if grad_out is None and grad_psi is None:
            return (None,) * _NUM_INPUTS
        x, g, *rest = ctx.saved_tensors  # the 5 weights, then the kept buffer if any
        fmt = dense_layout(x)
        grad_out = torch.zeros_like(x) if grad_out is None else grad_out.contiguous(memory_format=fmt).to(x.dtype)
        grad_psi = x.new_empty(0) if grad_psi is None else grad_psi.contiguous().to(x.dtype)
        grads = bwd_op(x, g, *rest, grad_out, grad_psi)
        return tuple(grad if need else None for grad, need in zip(grads, ctx.needs_input_grad))
    return backward


def register(backend: str) -> None:
    """Define ``r2unet_fast::attention_gate_<backend>`` and its ``_bwd`` (once per process)."""
    if backend in _REGISTERED:
        return
    launchers = importlib.import_module(_LAUNCHERS[backend])
    if backend in _KEEPS:
        define(op_name(backend, inference=True), backend, launchers.attention_gate_fwd, _fake_fwd)
        define_with_autograd(op_name(backend), backend, launchers.attention_gate_fwd_kept, _fake_fwd_kept,
                             launchers.attention_gate_bwd_kept, _fake_bwd_kept, _backward_through, _setup_context)
    else:
        define_with_autograd(op_name(backend), backend, launchers.attention_gate_fwd, _fake_fwd,
                             launchers.attention_gate_bwd, _fake_bwd, _backward_through, _setup_context)
    _REGISTERED.add(backend)


def prepare_inputs(x: torch.Tensor, g: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x and g in one memory format (x's, if it is contiguous or channels_last), the weights
    flat-contiguous in the compute dtype (float32; float64 for float64 x), copying only what
    must change."""
    fmt = dense_layout(x)
    dtype = compute_dtype(x)
    return (x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt),
            *(w.to(dtype).contiguous() for w in weights))


def _attention_gate(backend: str, x: torch.Tensor, g: torch.Tensor, w_x: torch.Tensor, w_g: torch.Tensor,
                    bias: torch.Tensor, w_psi: torch.Tensor, b_psi: torch.Tensor,
                    return_psi: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    ready("attention_gate", backend)
    inputs = prepare_inputs(x, g, w_x, w_g, bias, w_psi, b_psi)
    # without autograd (evaluation, prediction) nothing needs keeping for a backward
    inference = backend in _KEEPS and not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs))
    op = getattr(getattr(torch.ops, NAMESPACE), op_name(backend, inference=inference))
    out, psi = op(*inputs)[:2]
    return (out, psi) if return_psi else out


def attention_gate_triton(x: torch.Tensor, g: torch.Tensor, w_x: torch.Tensor, w_g: torch.Tensor,
                          bias: torch.Tensor, w_psi: torch.Tensor, b_psi: torch.Tensor, *,
                          return_psi: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`r2unet_fast.ops.reference.attention_gate` on the Triton kernels.

    Args:
        x: (N, Cx, H, W), g: (N, Cg, H, W), one float dtype (fp32/bf16/fp16 on CUDA; fp64
            under the interpreter), CUDA (or CPU under ``TRITON_INTERPRET=1``), any layout.
        w_x (F, Cx), w_g (F, Cg), bias (F,), w_psi (F,), b_psi (1,): any float dtype.
    Returns:
        out (N, Cx, H, W) in x's dtype and layout, and psi (N, 1, H, W) with ``return_psi``.
    """
    return _attention_gate("triton", x, g, w_x, w_g, bias, w_psi, b_psi, return_psi)


def attention_gate_cpu(x: torch.Tensor, g: torch.Tensor, w_x: torch.Tensor, w_g: torch.Tensor,
                       bias: torch.Tensor, w_psi: torch.Tensor, b_psi: torch.Tensor, *,
                       return_psi: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`r2unet_fast.ops.reference.attention_gate` on the C++ kernels (CPU tensors; float32
    and float64 natively, half precision computed in float32). Args and return as
    :func:`attention_gate_triton`."""
    return _attention_gate("cpu", x, g, w_x, w_g, bias, w_psi, b_psi, return_psi)
