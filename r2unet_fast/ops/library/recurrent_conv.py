"""``r2unet_fast::recurrent_conv_<backend>`` (cpu, triton): the RecurrentConv unit on fused passes.

The unit (:class:`r2unet_fast.nn.RecurrentConv`): ``F = conv_f(x) + b``, ``s_0 = F``,
``s_k = F + conv_r(h_{k-1})``, ``h_k = relu(bn_k(s_k))``, output ``h_t`` (plus ``residual``, the
RRCU block's ``x0``, when given). The 3x3 convolutions are ATen's (oneDNN on CPU, cuDNN on
CUDA); around them each step runs two fused passes of the backend's launchers
(:mod:`r2unet_fast.ops.cpu`, :mod:`r2unet_fast.ops.triton.recurrent_conv`; contracts in
tests/recurrent_conv_oracle.py) instead of eager's add, two statistics, normalize, ReLU (and
residual add) kernels:

- forward, per step: ``rc_add_stats`` adds F into the conv output in place and takes its batch
  statistics (with the step's BatchNorm scale and shift: ``rc_add_stats_affine`` on C++);
  ``rc_bn_relu`` gives ``h_k`` (with the residual on the last step). Saved for backward: x and
  every ``s_k``, never ``h`` or the BatchNorm output.
- backward, per step from the last: ``rc_bn_relu_bwd`` gives ``ds_k`` and the BatchNorm
  parameter gradients and adds ``ds_k`` into ``dF``; conv_r's weight gradient recomputes
  ``h_{k-1}`` from ``s_{k-1}`` (on the fly in the C++ ``conv3x3_wgrad``); finally conv_f's
  backward from ``dF``. The loops are :mod:`.recurrent_conv_steps`.

Ops per backend: ``recurrent_conv_train_<b>`` (autograd, batch statistics, returns every step's
numbers as ``stats`` (5, t + 1, C): mean, biased variance, scale, shift, rstd, so the module
updates its running statistics from the first two rows) and its
``_bwd``, and ``recurrent_conv_eval_<b>`` (running statistics, no autograd). ``w_r`` is optional
(``Tensor?``): at t = 0 the unit is ConvBNReLU (conv + BN + ReLU, ``nn.blocks``), which may change
the channel count and has no recurrent weight.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

from ..reference import compute_dtype
from . import NAMESPACE, define, define_with_autograd, dense_layout, profiled, ready
from .recurrent_conv_steps import STATS, affine, eval_fwd, train_bwd, train_fwd

_LAUNCHERS: dict[str, str] = {"triton": "r2unet_fast.ops.triton.recurrent_conv", "cpu": "r2unet_fast.ops.cpu"}
_REGISTERED: set[str] = set()
# Backends whose ops eager mode calls without torch.library's per-call machinery (argument
# flattening, schema defaults, redispatch: about 0.4 ms a unit, forward and backward, on a 2-core
# CPU), through _EAGER's autograd.Function and eval function, which run the same implementation and
# backward formula. torch.compile traces the registered ops. The Triton backend keeps the ops: its
# kernels are wrapped for torch.compile, and the GPU is where that path is verified.
_EAGER_BACKENDS = ("cpu",)
_EAGER: dict[str, tuple[type[torch.autograd.Function], Callable[..., torch.Tensor]]] = {}
# the backward op's outputs: dx (empty when not needed), dw_f, db_f, dw_r (empty at t = 0), dgamma, dbeta
_SIX_TENSORS = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def op_name(backend: str, mode: str, backward: bool = False) -> str:
    """``recurrent_conv_<mode>_<backend>`` (mode "train" or "eval") or its ``_bwd``."""
    return f"recurrent_conv_{mode}_{backend}" + ("_bwd" if backward else "")


def _strided_like(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    """``grad`` with ``like``'s strides (what the fake kernels promise): the convolution's backward
    picks its own layout, e.g. a channels_last weight gradient for channels_last activations."""
    if grad is None or like is None or grad.stride() == like.stride():
        return grad
    return torch.empty_like(like).copy_(grad)


def _fake_out(x: torch.Tensor, w_f: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    return x.new_empty((n, w_f.shape[0], h, w)).contiguous(memory_format=dense_layout(x))


def register(backend: str) -> None:
    """Define the train, its backward, and the eval ops of ``backend`` (once per process)."""
    if backend in _REGISTERED:
        return
    passes = importlib.import_module(_LAUNCHERS[backend])

    def train(x: torch.Tensor, w_f: torch.Tensor, b_f: torch.Tensor, w_r: torch.Tensor | None, gamma: torch.Tensor,
              beta: torch.Tensor, residual: torch.Tensor | None, t: int,
              eps: float) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        h, states, stats = train_fwd(passes, x, w_f, b_f, w_r, gamma, beta, residual, t, eps)
        fmt = dense_layout(x)
        return h.contiguous(memory_format=fmt), [s.contiguous(memory_format=fmt) for s in states], stats

    def fake_train(x: torch.Tensor, w_f: torch.Tensor, b_f: torch.Tensor, w_r: torch.Tensor | None,
                   gamma: torch.Tensor, beta: torch.Tensor, residual: torch.Tensor | None, t: int,
                   eps: float) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        out = _fake_out(x, w_f)
        stats = x.new_empty((len(STATS), t + 1, w_f.shape[0]), dtype=compute_dtype(x))
        return out, [torch.empty_like(out) for _ in range(t + 1)], stats

    def bwd(x: torch.Tensor, w_f: torch.Tensor, w_r: torch.Tensor | None, gamma: torch.Tensor,
            states: list[torch.Tensor], stats: torch.Tensor, grad: torch.Tensor, need_x: bool) -> _SIX_TENSORS:
        grads = train_bwd(passes, x, w_f, w_r, gamma, states, stats, grad, need_x)
        like_w_r = w_r if len(states) > 1 else None
        dx, d_w_f, d_b_f, d_w_r, d_gamma, d_beta = (_strided_like(g, like) for g, like in
                                                    zip(grads, (x, w_f, None, like_w_r, None, None)))
        if d_w_r is None:  # t = 0: conv_r never ran (w_r may be None); the autograd formula drops this
            d_w_r = w_f.new_empty(0)
        return x.new_empty(0) if dx is None else dx, d_w_f, d_b_f, d_w_r, d_gamma, d_beta

    def fake_bwd(x: torch.Tensor, w_f: torch.Tensor, w_r: torch.Tensor | None, gamma: torch.Tensor,
                 states: list[torch.Tensor], stats: torch.Tensor, grad: torch.Tensor, need_x: bool) -> _SIX_TENSORS:
        dx = torch.empty_like(x) if need_x else x.new_empty(0)
        d_w_r = torch.empty_like(w_r) if len(states) > 1 else w_f.new_empty(0)  # t = 0: empty, as train_bwd
        return (dx, torch.empty_like(w_f), w_f.new_empty(w_f.shape[0]), d_w_r, torch.empty_like(gamma),
                torch.empty_like(gamma))

    def save(ctx, inputs: tuple, states: list[torch.Tensor], stats: torch.Tensor) -> None:
        x, w_f, _, w_r, gamma, _, residual, _, _ = inputs
        ctx.save_for_backward(x, w_f, w_r, gamma, stats, *states)
        ctx.has_residual = residual is not None
        # else autograd hands backward a zero tensor per state and statistic: t + 1 activation-sized
        # fills per unit, which raised the backward's time and peak memory
        ctx.set_materialize_grads(False)

    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        _, states, stats = output
        save(ctx, inputs, states, stats)
        ctx.mark_non_differentiable(*states, stats)

    def backward_through(bwd_op):
        def backward(ctx, grad: torch.Tensor | None, *_unused) -> tuple:
            if grad is None:  # the output reached the loss only through non-differentiable paths
                return (None,) * len(ctx.needs_input_grad)
            x, w_f, w_r, gamma, stats, *states = ctx.saved_tensors
            grad = grad.contiguous(memory_format=dense_layout(states[0])).to(states[0].dtype)
            dx, d_w_f, d_b_f, d_w_r, d_gamma, d_beta = bwd_op(x, w_f, w_r, gamma, states, stats, grad,
                                                              ctx.needs_input_grad[0])
            if len(states) == 1:  # t = 0: conv_r never ran (w_r may be None); no gradient, as in eager
                d_w_r = None
            grads = (dx if ctx.needs_input_grad[0] else None, d_w_f, d_b_f, d_w_r, d_gamma, d_beta,
                     grad if ctx.has_residual else None)
            return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad)) + (None, None)
        return backward

    def evaluate(x: torch.Tensor, w_f: torch.Tensor, b_f: torch.Tensor, w_r: torch.Tensor | None,
                 scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor | None, t: int) -> torch.Tensor:
        return eval_fwd(passes, x, w_f, b_f, w_r, scale, shift, residual, t).contiguous(memory_format=dense_layout(x))

    def fake_evaluate(x: torch.Tensor, w_f: torch.Tensor, b_f: torch.Tensor, w_r: torch.Tensor | None,
                      scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor | None, t: int) -> torch.Tensor:
        return _fake_out(x, w_f)

    define_with_autograd(op_name(backend, "train"), backend, train, fake_train, bwd, fake_bwd,
                         backward_through, setup_context)
    define(op_name(backend, "eval"), backend, evaluate, fake_evaluate)
    if backend in _EAGER_BACKENDS:
        class EagerTrain(torch.autograd.Function):
            """The train op's eager path: the same implementation and backward formula, called
            directly. It returns h only: the states and statistics stay inside, the statistics
            reach the caller through ``stats_out``."""

            @staticmethod
            def forward(ctx, x, w_f, b_f, w_r, gamma, beta, residual, t, eps, stats_out):
                h, states, stats = train(x, w_f, b_f, w_r, gamma, beta, residual, t, eps)
                save(ctx, (x, w_f, b_f, w_r, gamma, beta, residual, t, eps), states, stats)
                stats_out.append(stats)
                return h

            backward = staticmethod(lambda ctx, grad: backward_through(bwd)(ctx, grad) + (None,))

        _EAGER[backend] = (EagerTrain, evaluate)
    _REGISTERED.add(backend)


def recurrent_conv_fast(backend: str, x: torch.Tensor, w_f: torch.Tensor, b_f: torch.Tensor,
                        w_r: torch.Tensor | None, gammas: list[torch.Tensor], betas: list[torch.Tensor], t: int,
                        eps: float, *, training: bool, running: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                        residual: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unit on ``backend``'s fused op.

    Args:
        x: (N, Cin, H, W); w_f (C, Cin, 3, 3), b_f (C,), w_r (C, C, 3, 3) (``w_f`` itself when tied; None
            allowed at t = 0).
        gammas, betas: one (C,) per BatchNorm (1 shared or t + 1).
        training: batch statistics and autograd; else ``running`` (mean, var) per BatchNorm.
        residual: (N, C, H, W) added to the output (the RRCU block's x0), or None.
    Returns:
        (out (N, C, H, W) in x's layout, stats (5, t + 1, C): each step's batch mean, biased batch
        variance, BatchNorm scale, shift and rstd); stats is None in eval mode. Running statistics
        are the caller's to update (:func:`update_running_stats`).
    """
    ready("recurrent_conv", backend)
    fmt = dense_layout(x)
    x = x.contiguous(memory_format=fmt)
    if residual is not None:
        residual = residual.contiguous(memory_format=fmt).to(x.dtype)
    ops = getattr(torch.ops, NAMESPACE)
    w_r = None if w_r is None else w_r.to(x.dtype)
    eager = None if torch.compiler.is_compiling() else _EAGER.get(backend)
    if training:
        args = (x, w_f.to(x.dtype), b_f.to(x.dtype), w_r, torch.stack(gammas), torch.stack(betas), residual, t, eps)
        if eager is not None:
            stats_out: list[torch.Tensor] = []
            with profiled(op_name(backend, "train")):
                return eager[0].apply(*args, stats_out), stats_out[0]
        out, _, stats = getattr(ops, op_name(backend, "train"))(*args)
        return out, stats
    dtype = compute_dtype(x)
    running_means, running_vars = zip(*running)
    scale, shift, _ = affine(torch.stack(gammas), torch.stack(betas), torch.stack(running_means).to(dtype),
                             torch.stack(running_vars).to(dtype), eps)
    evaluate = eager[1] if eager is not None else getattr(ops, op_name(backend, "eval"))
    with profiled(op_name(backend, "eval")):
        return evaluate(x, w_f.to(x.dtype), b_f.to(x.dtype), w_r, scale, shift, residual, t), None


def _update_in_one_call(backend: str, stats: torch.Tensor, count: int, running_means: list[torch.Tensor],
                        running_vars: list[torch.Tensor], num_batches_tracked: list[torch.Tensor] | None,
                        momentum: float | None) -> bool:
    """The backend's one-call update (C++), where it has one and these tensors suit it: eager mode
    (a compiled graph keeps the multi-tensor ops below) and running statistics of the stats'
    dtype. Returns whether it ran."""
    if torch.compiler.is_compiling() or stats.device.type != "cpu":
        return False
    update = getattr(importlib.import_module(_LAUNCHERS[backend]), "rc_update_running_stats", None)
    if update is None:
        return False
    if not all(r.dtype == stats.dtype and r.device == stats.device and r.is_contiguous()
               for r in (*running_means, *running_vars)):
        return False
    update(stats, running_means, running_vars, num_batches_tracked, momentum, count)
    return True


@torch.no_grad()
def update_running_stats(backend: str, stats: torch.Tensor, count: int, running_means: list[torch.Tensor],
                         running_vars: list[torch.Tensor], num_batches_tracked: list[torch.Tensor] | None,
                         momentum: float | None) -> None:
    """What ``nn.BatchNorm2d`` does with step k's batch statistics (``stats`` rows 0 and 1, mean and
    biased variance, (t + 1, C) each), step after step (a shared BatchNorm is updated t + 1 times,
    as eager calls it t + 1 times): unbiased variance of ``count`` values per channel,
    ``momentum=None`` the cumulative average. On the C++ backend one call does it all; a unit's
    dozen tiny torch ops cost about 0.3 ms on a 2-core CPU."""
    if _update_in_one_call(backend, stats, count, running_means, running_vars, num_batches_tracked, momentum):
        return
    means, variances = stats[0], stats[1]
    unbias = count / max(count - 1, 1)
    steps = means.shape[0]
    if (momentum is not None and len(running_means) == steps
            and all(r.dtype == means.dtype for r in (*running_means, *running_vars))):
        # one BatchNorm per step: every step's update at once (multi-tensor ops, same arithmetic)
        if num_batches_tracked is not None:
            torch._foreach_add_(num_batches_tracked, 1)
        torch._foreach_mul_(running_means, 1 - momentum)
        torch._foreach_add_(running_means, list(means.unbind(0)), alpha=momentum)
        torch._foreach_mul_(running_vars, 1 - momentum)
        torch._foreach_add_(running_vars, list(variances.unbind(0)), alpha=momentum * unbias)
        return
    for k in range(steps):
        i = min(k, len(running_means) - 1)
        factor = momentum
        if num_batches_tracked is not None:
            num_batches_tracked[i].add_(1)
            if momentum is None:
                factor = 1.0 / float(num_batches_tracked[i])
        factor = factor or 0.0
        running_means[i].mul_(1 - factor).add_(means[k].to(running_means[i].dtype), alpha=factor)
        running_vars[i].mul_(1 - factor).add_(variances[k].to(running_vars[i].dtype), alpha=factor * unbias)


def _recurrent_conv(backend: str, x: torch.Tensor, w_f: torch.Tensor, b_f: torch.Tensor,
                    w_r: torch.Tensor | None, gammas: list[torch.Tensor], betas: list[torch.Tensor],
                    running_means: list[torch.Tensor], running_vars: list[torch.Tensor],
                    num_batches_tracked: list[torch.Tensor] | None, *, t: int, training: bool,
                    momentum: float | None = 0.1, eps: float = 1e-5, residual: torch.Tensor | None = None) -> torch.Tensor:
    tensors = [v for v in (x, w_f, b_f, w_r, *gammas, *betas, residual) if v is not None]
    if not training and torch.is_grad_enabled() and any(v.requires_grad for v in tensors):
        # the eval op has no backward (it is for inference): gradients through running statistics
        # (a frozen-BatchNorm fine-tune) take the reference, which gives the same values
        from ..reference import recurrent_conv

        return recurrent_conv(x, w_f, b_f, w_r, gammas, betas, running_means, running_vars, num_batches_tracked,
                              t=t, training=False, momentum=momentum, eps=eps, residual=residual)
    out, stats = recurrent_conv_fast(backend, x, w_f, b_f, w_r, gammas, betas, t, eps, training=training,
                                     running=list(zip(running_means, running_vars)), residual=residual)
    if training:
        n, _, h, w = out.shape
        update_running_stats(backend, stats, n * h * w, running_means, running_vars, num_batches_tracked, momentum)
    return out


def recurrent_conv_cpu(*args, **kwargs) -> torch.Tensor:
    """:func:`r2unet_fast.ops.reference.recurrent_conv` on the C++ passes (CPU tensors)."""
    return _recurrent_conv("cpu", *args, **kwargs)


def recurrent_conv_triton(*args, **kwargs) -> torch.Tensor:
    """:func:`r2unet_fast.ops.reference.recurrent_conv` on the Triton passes (CUDA tensors, or CPU
    tensors under ``TRITON_INTERPRET=1``)."""
    return _recurrent_conv("triton", *args, **kwargs)
