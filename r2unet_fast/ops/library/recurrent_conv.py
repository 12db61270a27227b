"""``r2unet_fast::recurrent_conv_<backend>`` (cpu, triton): the RecurrentConv unit on fused passes.

The unit (:class:`r2unet_fast.nn.RecurrentConv`): ``F = conv_f(x) + b``, ``s_0 = F``,
``s_k = F + conv_r(h_{k-1})``, ``h_k = relu(bn_k(s_k))``, output ``h_t`` (plus ``residual``, the
RRCU block's ``x0``, when given). The 3x3 convolutions are ATen's (oneDNN on CPU, cuDNN on
CUDA); around them each step runs two fused passes of the backend's launchers
(:mod:`r2unet_fast.ops.cpu`, :mod:`r2unet_fast.ops.triton.recurrent_conv`; contracts in
tests/recurrent_conv_oracle.py) instead of eager's add, two statistics, normalize, ReLU (and
residual add) kernels:

- forward, per step: ``rc_add_stats`` adds F into the conv output in place and takes its batch
  statistics; ``rc_bn_relu`` gives ``h_k`` (with the residual on the last step). Saved for
  backward: x and every ``s_k``, never ``h`` or the BatchNorm output.
- backward, per step from the last: ``rc_bn_relu_bwd`` gives ``ds_k`` and the BatchNorm
  parameter gradients and adds ``ds_k`` into ``dF``; ``h_{k-1}`` is recomputed from ``s_{k-1}``
  by ``rc_bn_relu`` for the convolution's backward; finally conv_f's backward from ``dF``.

Ops per backend: ``recurrent_conv_train_<b>`` (autograd, batch statistics, returns the batch mean
and biased variance of every step so the module updates its running statistics) and its
``_bwd``, and ``recurrent_conv_eval_<b>`` (running statistics, no autograd). ``w_r`` is optional
(``Tensor?``): at t = 0 the unit is ConvBNReLU (conv + BN + ReLU, ``nn.blocks``), which may change
the channel count and has no recurrent weight.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from ..reference import compute_dtype
from . import NAMESPACE, define, define_with_autograd, dense_layout, ready

_LAUNCHERS: dict[str, str] = {"triton": "r2unet_fast.ops.triton.recurrent_conv", "cpu": "r2unet_fast.ops.cpu"}
_REGISTERED: set[str] = set()
# the backward op's outputs: dx (empty when not needed), dw_f, db_f, dw_r (empty at t = 0), dgamma, dbeta
_SIX_TENSORS = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def op_name(backend: str, mode: str, backward: bool = False) -> str:
    """``recurrent_conv_<mode>_<backend>`` (mode "train" or "eval") or its ``_bwd``."""
    return f"recurrent_conv_{mode}_{backend}" + ("_bwd" if backward else "")


def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(x, w, b, padding=1)


def _conv_bwd(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, *, weight: bool) -> torch.Tensor:
    """The 3x3 convolution's (padding 1, no bias) weight gradient, or its input gradient."""
    grads = torch.ops.aten.convolution_backward(grad, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                [not weight, weight, False])
    return grads[1] if weight else grads[0]


# At the top levels the step backward's transients are the largest tensors alive, so the
# recurrent convolution's backward works on groups of whole images there: the weight gradient
# recomputes h_{k-1} a group at a time, and the data gradient overwrites ds_k group by group. Groups
# of at least RECOMPUTE_BYTES and at most RECOMPUTE_GROUPS per batch keep each call efficient.
RECOMPUTE_BYTES = 1 << 20
RECOMPUTE_GROUPS = 4


def _image_groups(t: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) image ranges splitting t's batch (one range for a small tensor)."""
    n = t.shape[0]
    groups = max(1, min(n, RECOMPUTE_GROUPS, -(-t.numel() * t.element_size() // RECOMPUTE_BYTES)))
    bounds = [n * i // groups for i in range(groups + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _fused_wgrad(passes, grad: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the backend has a 3x3 weight-gradient kernel for these tensors (the C++ one, which
    also applies the recomputed BatchNorm + ReLU as it loads its input)."""
    applies = getattr(passes, "conv3x3_wgrad_applies", None)
    return applies is not None and applies(grad, x)


def _recurrent_conv_bwd(passes, ds: torch.Tensor, s_prev: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                        w_r: torch.Tensor, overwrite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """conv_r's backward at step k: (dh_{k-1}, dw_r) from ds_k, with ``h_{k-1} = relu(s_prev * scale +
    shift)`` recomputed. ``overwrite``: ds may be replaced by dh_{k-1} in place.
    ds, s_prev: (N, C, H, W) in one layout; scale, shift (C,)."""
    groups = _image_groups(s_prev)
    if _fused_wgrad(passes, ds, s_prev):
        dw = passes.conv3x3_wgrad(ds, s_prev, scale, shift)
    else:
        dw = None
        for lo, hi in groups:
            h = passes.rc_bn_relu(s_prev[lo:hi], None, scale, shift, None)
            part = _conv_bwd(ds[lo:hi], h, w_r, weight=True)
            del h  # before the next group's h exists
            dw = part if dw is None else dw + part
    if len(groups) == 1 or not overwrite:
        return _conv_bwd(ds, s_prev, w_r, weight=False), dw  # s_prev gives the input's shape only
    for lo, hi in groups:
        ds[lo:hi].copy_(_conv_bwd(ds[lo:hi], s_prev[lo:hi], w_r, weight=False))
    return ds, dw


def _feed_conv_bwd(passes, d_feed: torch.Tensor, x: torch.Tensor, w_f: torch.Tensor,
                   need_x: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """conv_f's backward from dF: (dx or None, dw_f, db_f)."""
    if not _fused_wgrad(passes, d_feed, x):
        return torch.ops.aten.convolution_backward(d_feed, x, w_f, [w_f.shape[0]], [1, 1], [1, 1], [1, 1], False,
                                                   [0, 0], 1, [need_x, True, True])
    dx = _conv_bwd(d_feed, x, w_f, weight=False) if need_x else None
    return dx, passes.conv3x3_wgrad(d_feed, x, None, None), d_feed.sum((0, 2, 3))


def _affine(gamma: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm as ``s * scale + shift``: (scale, shift, rstd), each (C,) in mean's dtype."""
    rstd = torch.rsqrt(var + eps)
    scale = gamma.to(mean.dtype) * rstd
    return scale, beta.to(mean.dtype) - mean * scale, rstd


def _step_norm(k: int, rows: int) -> int:
    return min(k, rows - 1)  # one shared row, or a row per step


def _train_fwd(passes, x: torch.Tensor, w_f: torch.Tensor, b_f: torch.Tensor, w_r: torch.Tensor | None,
               gamma: torch.Tensor, beta: torch.Tensor, residual: torch.Tensor | None, t: int,
               eps: float) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    feed = _conv(x, w_f, b_f)
    states, means, variances = [feed], [], []
    h = feed
    for k in range(t + 1):
        if k > 0:
            s = _conv(h, w_r, None)
            mean, var = passes.rc_add_stats(s, feed)  # s := F + conv_r(h), in place
            states.append(s)
        else:
            mean, var = passes.rc_add_stats(feed, None)
        means.append(mean)
        variances.append(var)
        row = _step_norm(k, gamma.shape[0])
        scale, shift, _ = _affine(gamma[row], beta[row], mean, var, eps)
        h = passes.rc_bn_relu(states[k], None, scale, shift, residual if k == t else None)
    return h, states, torch.stack(means), torch.stack(variances)


def _train_bwd(passes, x: torch.Tensor, w_f: torch.Tensor, w_r: torch.Tensor | None, gamma: torch.Tensor,
               beta: torch.Tensor, states: list[torch.Tensor], means: torch.Tensor, variances: torch.Tensor,
               grad: torch.Tensor, eps: float, need_x: bool) -> tuple[torch.Tensor | None, ...]:
    t = len(states) - 1
    affine = [_affine(gamma[_step_norm(k, gamma.shape[0])], beta[_step_norm(k, gamma.shape[0])], means[k],
                      variances[k], eps) for k in range(t + 1)]
    dtype = compute_dtype(states[0])
    d_gamma = torch.zeros(gamma.shape, dtype=dtype, device=gamma.device)
    d_beta = torch.zeros(beta.shape, dtype=dtype, device=beta.device)
    d_feed = None  # dF = sum of every ds_k: the last step's ds becomes the accumulator, no zero fill
    d_w_r = None
    # Two activation-sized temporaries live at once at the top levels (dF, and ds_k which becomes
    # dh_{k-1}, plus a group's slice), three below: each is dropped as soon as it is read, ds_k
    # overwrites the dh_k this function allocated, and the weight gradient runs before the data
    # gradient (:func:`_recurrent_conv_bwd`).
    dh, dh_owned = grad, False
    for k in range(t, -1, -1):
        scale, shift, rstd = affine[k]
        row = _step_norm(k, gamma.shape[0])
        write_ds = k > 0 or d_feed is None
        in_place = write_ds and dh_owned and dh.stride() == states[k].stride()
        ds, sum_dy, sum_dy_xhat = passes.rc_bn_relu_bwd(states[k], dh, scale, shift, means[k], rstd,
                                                        gamma[row].to(dtype), d_feed, write_ds, ds_into_dh=in_place)
        dh = None
        d_gamma[row] += sum_dy_xhat
        d_beta[row] += sum_dy
        if k > 0:
            prev_scale, prev_shift, _ = affine[k - 1]
            dh, dw = _recurrent_conv_bwd(passes, ds, states[k - 1], prev_scale, prev_shift, w_r,
                                         overwrite=d_feed is not None)
            dh_owned = True
            d_w_r = dw if d_w_r is None else d_w_r + dw
        if d_feed is None:
            d_feed = ds  # read by the convolutions' backward above already; from now on summed into
        ds = None
    dx, d_w_f, d_b_f = _feed_conv_bwd(passes, d_feed, x, w_f, need_x)
    if d_w_r is None:  # t = 0: conv_r never ran (w_r may be None); the autograd formula drops this
        d_w_r = w_f.new_empty(0)
    return dx, d_w_f, d_b_f, d_w_r, d_gamma.to(gamma.dtype), d_beta.to(beta.dtype)


def _eval_fwd(passes, x: torch.Tensor, w_f: torch.Tensor, b_f: torch.Tensor, w_r: torch.Tensor | None,
              scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor | None, t: int) -> torch.Tensor:
    feed = _conv(x, w_f, b_f)
    h = passes.rc_bn_relu(feed, None, scale[0], shift[0], residual if t == 0 else None)
    for k in range(1, t + 1):
        row = _step_norm(k, scale.shape[0])
        h = passes.rc_bn_relu(_conv(h, w_r, None), feed, scale[row], shift[row], residual if k == t else None)
    return h


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
              eps: float) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        h, states, means, variances = _train_fwd(passes, x, w_f, b_f, w_r, gamma, beta, residual, t, eps)
        fmt = dense_layout(x)
        return h.contiguous(memory_format=fmt), [s.contiguous(memory_format=fmt) for s in states], means, variances

    def fake_train(x: torch.Tensor, w_f: torch.Tensor, b_f: torch.Tensor, w_r: torch.Tensor | None,
                   gamma: torch.Tensor, beta: torch.Tensor, residual: torch.Tensor | None, t: int,
                   eps: float) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        out = _fake_out(x, w_f)
        stats = x.new_empty((t + 1, w_f.shape[0]), dtype=compute_dtype(x))
        return out, [torch.empty_like(out) for _ in range(t + 1)], stats, torch.empty_like(stats)

    def train_bwd(x: torch.Tensor, w_f: torch.Tensor, w_r: torch.Tensor | None, gamma: torch.Tensor,
                  beta: torch.Tensor, states: list[torch.Tensor], means: torch.Tensor, variances: torch.Tensor,
                  grad: torch.Tensor, eps: float, need_x: bool) -> _SIX_TENSORS:
        grads = _train_bwd(passes, x, w_f, w_r, gamma, beta, states, means, variances, grad, eps, need_x)
        like_w_r = w_r if len(states) > 1 else None  # at t = 0 dw_r is an empty placeholder
        dx, d_w_f, d_b_f, d_w_r, d_gamma, d_beta = (_strided_like(g, like) for g, like in
                                                    zip(grads, (x, w_f, None, like_w_r, None, None)))
        return x.new_empty(0) if dx is None else dx, d_w_f, d_b_f, d_w_r, d_gamma, d_beta

    def fake_train_bwd(x: torch.Tensor, w_f: torch.Tensor, w_r: torch.Tensor | None, gamma: torch.Tensor,
                       beta: torch.Tensor, states: list[torch.Tensor], means: torch.Tensor, variances: torch.Tensor,
                       grad: torch.Tensor, eps: float, need_x: bool) -> _SIX_TENSORS:
        dx = torch.empty_like(x) if need_x else x.new_empty(0)
        d_w_r = torch.empty_like(w_r) if len(states) > 1 else w_f.new_empty(0)  # t = 0: empty, as train_bwd
        return (dx, torch.empty_like(w_f), w_f.new_empty(w_f.shape[0]), d_w_r, torch.empty_like(gamma),
                torch.empty_like(beta))

    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        x, w_f, _, w_r, gamma, beta, residual, _, eps = inputs
        _, states, means, variances = output
        ctx.save_for_backward(x, w_f, w_r, gamma, beta, means, variances, *states)
        ctx.eps, ctx.has_residual = eps, residual is not None
        ctx.mark_non_differentiable(*states, means, variances)
        # else autograd hands backward a zero tensor per state and statistic: t + 1 activation-sized
        # fills per unit, which raised the backward's time and peak memory
        ctx.set_materialize_grads(False)

    def backward_through(bwd_op):
        def backward(ctx, grad: torch.Tensor | None, *_unused) -> tuple:
            if grad is None:  # the output reached the loss only through non-differentiable paths
                return (None,) * len(ctx.needs_input_grad)
            x, w_f, w_r, gamma, beta, means, variances, *states = ctx.saved_tensors
            grad = grad.contiguous(memory_format=dense_layout(states[0])).to(states[0].dtype)
            dx, d_w_f, d_b_f, d_w_r, d_gamma, d_beta = bwd_op(x, w_f, w_r, gamma, beta, states, means, variances,
                                                              grad, ctx.eps, ctx.needs_input_grad[0])
            if len(states) == 1:  # t = 0: conv_r never ran (w_r may be None); no gradient, as in eager
                d_w_r = None
            grads = (dx if ctx.needs_input_grad[0] else None, d_w_f, d_b_f, d_w_r, d_gamma, d_beta,
                     grad if ctx.has_residual else None)
            return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad)) + (None, None)
        return backward

    def evaluate(x: torch.Tensor, w_f: torch.Tensor, b_f: torch.Tensor, w_r: torch.Tensor | None,
                 scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor | None, t: int) -> torch.Tensor:
        return _eval_fwd(passes, x, w_f, b_f, w_r, scale, shift, residual, t).contiguous(memory_format=dense_layout(x))

    def fake_evaluate(x: torch.Tensor, w_f: torch.Tensor, b_f: torch.Tensor, w_r: torch.Tensor | None,
                      scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor | None, t: int) -> torch.Tensor:
        return _fake_out(x, w_f)

    define_with_autograd(op_name(backend, "train"), backend, train, fake_train, train_bwd, fake_train_bwd,
                         backward_through, setup_context)
    define(op_name(backend, "eval"), backend, evaluate, fake_evaluate)
    _REGISTERED.add(backend)


def recurrent_conv_fast(backend: str, x: torch.Tensor, w_f: torch.Tensor, b_f: torch.Tensor,
                        w_r: torch.Tensor | None, gammas: list[torch.Tensor], betas: list[torch.Tensor], t: int,
                        eps: float, *, training: bool, running: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                        residual: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The unit on ``backend``'s fused op.

    Args:
        x: (N, Cin, H, W); w_f (C, Cin, 3, 3), b_f (C,), w_r (C, C, 3, 3) (``w_f`` itself when tied; None
            allowed at t = 0).
        gammas, betas: one (C,) per BatchNorm (1 shared or t + 1).
        training: batch statistics and autograd; else ``running`` (mean, var) per BatchNorm.
        residual: (N, C, H, W) added to the output (the RRCU block's x0), or None.
    Returns:
        (out (N, C, H, W) in x's layout, batch means (t + 1, C), biased batch variances (t + 1, C));
        the statistics are None in eval mode. Running statistics are the caller's to update.
    """
    ready("recurrent_conv", backend)
    fmt = dense_layout(x)
    x = x.contiguous(memory_format=fmt)
    if residual is not None:
        residual = residual.contiguous(memory_format=fmt).to(x.dtype)
    ops = getattr(torch.ops, NAMESPACE)
    w_r = None if w_r is None else w_r.to(x.dtype)
    if training:
        out, _, means, variances = getattr(ops, op_name(backend, "train"))(
            x, w_f.to(x.dtype), b_f.to(x.dtype), w_r, torch.stack(gammas), torch.stack(betas), residual,
            t, eps)
        return out, means, variances
    dtype = compute_dtype(x)
    affine = [_affine(g, b, rm.to(dtype), rv.to(dtype), eps)[:2] for g, b, (rm, rv) in zip(gammas, betas, running)]
    scale, shift = torch.stack([a[0] for a in affine]), torch.stack([a[1] for a in affine])
    out = getattr(ops, op_name(backend, "eval"))(x, w_f.to(x.dtype), b_f.to(x.dtype), w_r, scale, shift,
                                                 residual, t)
    return out, None, None


@torch.no_grad()
def update_running_stats(means: torch.Tensor, variances: torch.Tensor, count: int,
                         running_means: list[torch.Tensor], running_vars: list[torch.Tensor],
                         num_batches_tracked: list[torch.Tensor] | None, momentum: float | None) -> None:
    """What ``nn.BatchNorm2d`` does with step k's batch statistics, step after step (a shared
    BatchNorm is updated t + 1 times, as eager calls it t + 1 times): unbiased variance of
    ``count`` values per channel, ``momentum=None`` the cumulative average."""
    unbias = count / max(count - 1, 1)
    for k in range(means.shape[0]):
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
    out, means, variances = recurrent_conv_fast(backend, x, w_f, b_f, w_r, gammas, betas, t, eps, training=training,
                                                running=list(zip(running_means, running_vars)), residual=residual)
    if training:
        n, _, h, w = out.shape
        update_running_stats(means, variances, n * h * w, running_means, running_vars, num_batches_tracked,
                             momentum)
    return out


def recurrent_conv_cpu(*args, **kwargs) -> torch.Tensor:
    """:func:`r2unet_fast.ops.reference.recurrent_conv` on the C++ passes (CPU tensors)."""
    return _recurrent_conv("cpu", *args, **kwargs)


def recurrent_conv_triton(*args, **kwargs) -> torch.Tensor:
    """:func:`r2unet_fast.ops.reference.recurrent_conv` on the Triton passes (CUDA tensors, or CPU
    tensors under ``TRITON_INTERPRET=1``)."""
    return _recurrent_conv("triton", *args, **kwargs)
