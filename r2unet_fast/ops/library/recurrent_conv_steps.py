"""The recurrent conv unit's step loops, shared by the C++ and Triton backends
(:mod:`.recurrent_conv` registers them as library ops): the training forward, its backward and
the eval forward, around ATen's convolutions and the backend's fused passes (``passes``:
:mod:`r2unet_fast.ops.cpu` or :mod:`r2unet_fast.ops.triton.recurrent_conv`; contracts in
tests/recurrent_conv_oracle.py).

Each step's per-channel numbers live in one ``stats`` tensor (:data:`STATS`), (5, t + 1, C) in
the compute dtype: the batch mean and biased variance, the BatchNorm as ``s * scale + shift`` and
``rstd``. The forward fills it (the C++ backend in one call per step), backward reads it, and the
module updates the running statistics from its first two rows. On a CPU a tiny torch op costs
tens of microseconds, and a unit ran about seventy of them before.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import compute_dtype

STATS = ("mean", "var", "scale", "shift", "rstd")


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


def _hook(passes, name: str, *args: torch.Tensor) -> bool:
    """Whether the backend's fused kernel ``name`` (e.g. ``conv3x3_wgrad``: its ``<name>_applies``)
    runs these tensors; False for a backend without one."""
    applies = getattr(passes, f"{name}_applies", None)
    return applies is not None and applies(*args)


def _dgrad(passes, grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The 3x3 convolution's input gradient (x gives the input's shape): the backend's kernel or ATen's."""
    if _hook(passes, "conv3x3_dgrad", grad, w):
        return passes.conv3x3_dgrad(grad, w)
    return _conv_bwd(grad, x, w, weight=False)


def _recurrent_conv_bwd(passes, ds: torch.Tensor, s_prev: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                        w_r: torch.Tensor, overwrite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """conv_r's backward at step k: (dh_{k-1}, dw_r) from ds_k, with ``h_{k-1} = relu(s_prev * scale +
    shift)`` recomputed (on load, where the backend's ``conv3x3_wgrad`` runs). ``overwrite``: ds may
    be replaced by dh_{k-1} in place. ds, s_prev: (N, C, H, W) in one layout; scale, shift (C,)."""
    groups = _image_groups(s_prev)
    if _hook(passes, "conv3x3_wgrad", ds, s_prev):
        dw = passes.conv3x3_wgrad(ds, s_prev, scale, shift)
    else:
        dw = None
        for lo, hi in groups:
            h = passes.rc_bn_relu(s_prev[lo:hi], None, scale, shift, None)
            part = _conv_bwd(ds[lo:hi], h, w_r, weight=True)
            del h  # before the next group's h exists
            dw = part if dw is None else dw + part
    fused = _hook(passes, "conv3x3_dgrad", ds, w_r)

    def dgrad(lo: int, hi: int) -> torch.Tensor:  # images lo .. hi - 1; s_prev gives the input's shape only
        return passes.conv3x3_dgrad(ds[lo:hi], w_r) if fused else _conv_bwd(ds[lo:hi], s_prev[lo:hi], w_r,
                                                                              weight=False)

    if len(groups) == 1 or not overwrite:
        return dgrad(0, ds.shape[0]), dw
    for lo, hi in groups:
        ds[lo:hi].copy_(dgrad(lo, hi))
    return ds, dw


def _feed_conv_bwd(passes, d_feed: torch.Tensor, x: torch.Tensor, w_f: torch.Tensor,
                   need_x: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """conv_f's backward from dF: (dx or None, dw_f, db_f)."""
    if not _hook(passes, "conv3x3_wgrad", d_feed, x):
        fused_dx = need_x and _hook(passes, "conv3x3_dgrad", d_feed, w_f)
        dx, dw, db = torch.ops.aten.convolution_backward(d_feed, x, w_f, [w_f.shape[0]], [1, 1], [1, 1], [1, 1], False,
                                                         [0, 0], 1, [need_x and not fused_dx, True, True])
        return (passes.conv3x3_dgrad(d_feed, w_f) if fused_dx else dx), dw, db
    dx = _dgrad(passes, d_feed, x, w_f) if need_x else None
    return dx, passes.conv3x3_wgrad(d_feed, x, None, None), d_feed.sum((0, 2, 3))


def step_norm(k: int, rows: int) -> int:
    """The BatchNorm row of step k: one shared row, or a row per step."""
    return min(k, rows - 1)


def affine(gamma: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm as ``s * scale + shift``: (scale, shift, rstd), each like mean (any leading shape)."""
    rstd = torch.rsqrt(var + eps)
    scale = gamma.to(mean.dtype) * rstd
    return scale, beta.to(mean.dtype) - mean * scale, rstd


def _set_stats(stats: torch.Tensor, k: int, mean: torch.Tensor, var: torch.Tensor, gamma: torch.Tensor,
               beta: torch.Tensor, row: int, eps: float) -> None:
    """stats[:, k] from step k's batch mean and biased variance and BatchNorm row ``row``."""
    scale, shift, rstd = affine(gamma[row], beta[row], mean, var, eps)
    stats[:, k] = torch.stack([mean, var, scale, shift, rstd])


def _step_stats(passes, out: torch.Tensor, feed: torch.Tensor | None, gamma: torch.Tensor, beta: torch.Tensor,
                row: int, eps: float, stats: torch.Tensor, k: int) -> None:
    """``out += feed`` in place, then stats[:, k] from out's batch statistics and BatchNorm row ``row``
    (gamma, beta: (norms, C) in stats' dtype)."""
    fused = getattr(passes, "rc_add_stats_affine", None)
    if fused is not None and out.dtype == stats.dtype:
        fused(out, feed, gamma, beta, row, eps, stats, k)
        return
    mean, var = passes.rc_add_stats(out, feed)
    _set_stats(stats, k, mean, var, gamma, beta, row, eps)


def _fused_step(passes, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, scale: torch.Tensor | None,
                shift: torch.Tensor | None, feed: torch.Tensor | None, gamma: torch.Tensor, beta: torch.Tensor,
                row: int, eps: float, stats: torch.Tensor, k: int) -> torch.Tensor:
    """s = the backend's fused convolution (``rc_conv``), and stats[:, k] from it: taken in the same
    launch (Triton's epilogue), or by the one-call statistics pass where the backend has it (C++)."""
    if getattr(passes, "rc_add_stats_affine", None) is None:
        s, mean, var = passes.rc_conv(x, w, b, scale, shift, feed)
        _set_stats(stats, k, mean, var, gamma, beta, row, eps)
        return s
    s = passes.rc_conv(x, w, b, scale, shift, feed, stats=False)[0]
    _step_stats(passes, s, None, gamma, beta, row, eps, stats, k)
    return s


def train_fwd(passes, x: torch.Tensor, w_f: torch.Tensor, b_f: torch.Tensor, w_r: torch.Tensor | None,
              gamma: torch.Tensor, beta: torch.Tensor, residual: torch.Tensor | None, t: int,
              eps: float) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """The unit in training mode: (h_t (+ residual), [s_0 .. s_t], stats (5, t + 1, C)).

    Where the backend's fused convolution runs (``rc_conv``), a step is one launch: conv_r loads
    ``h_{k-1}`` as ``relu(s_{k-1} * scale + shift)``, adds F and takes the batch statistics as it
    stores ``s_k``, so no h is stored; else ATen's convolution between the two fused passes."""
    dtype = compute_dtype(x)
    gamma, beta = gamma.to(dtype).contiguous(), beta.to(dtype).contiguous()
    stats = torch.empty((len(STATS), t + 1, gamma.shape[1]), dtype=dtype, device=x.device)
    if _hook(passes, "rc_conv", x, w_f, b_f, None, None, None):
        feed = _fused_step(passes, x, w_f, b_f, None, None, None, gamma, beta, 0, eps, stats, 0)
    else:
        feed = _conv(x, w_f, b_f)
        _step_stats(passes, feed, None, gamma, beta, 0, eps, stats, 0)
    states = [feed]
    # one choice for conv_r per unit: its steps share every shape
    fused = t > 0 and _hook(passes, "rc_conv", feed, w_r, None, stats[2, 0], stats[3, 0], feed)
    for k in range(1, t + 1):
        row = step_norm(k, gamma.shape[0])
        if fused:
            s = _fused_step(passes, states[k - 1], w_r, None, stats[2, k - 1], stats[3, k - 1], feed, gamma, beta,
                            row, eps, stats, k)
        else:
            s = _conv(passes.rc_bn_relu(states[k - 1], None, stats[2, k - 1], stats[3, k - 1], None), w_r, None)
            _step_stats(passes, s, feed, gamma, beta, row, eps, stats, k)  # s := F + conv_r(h), in place
        states.append(s)
    return passes.rc_bn_relu(states[t], None, stats[2, t], stats[3, t], residual), states, stats


def train_bwd(passes, x: torch.Tensor, w_f: torch.Tensor, w_r: torch.Tensor | None, gamma: torch.Tensor,
              states: list[torch.Tensor], stats: torch.Tensor, grad: torch.Tensor,
              need_x: bool) -> tuple[torch.Tensor | None, ...]:
    """Every gradient of :func:`train_fwd` from the output's: (dx or None, dw_f, db_f, dw_r or None at
    t = 0, dgamma, dbeta), the last two like gamma."""
    t = len(states) - 1
    mean, _, scale, shift, rstd = (field.unbind(0) for field in stats.unbind(0))
    gammas = gamma.to(stats.dtype).unbind(0)
    sum_dy, sum_dy_xhat = [None] * (t + 1), [None] * (t + 1)
    d_feed = None  # dF = sum of every ds_k: the last step's ds becomes the accumulator, no zero fill
    d_w_r = None
    # Two activation-sized temporaries live at once at the top levels (dF, and ds_k which becomes
    # dh_{k-1}, plus a group's slice), three below: each is dropped as soon as it is read, ds_k
    # overwrites the dh_k this function allocated, and the weight gradient runs before the data
    # gradient (:func:`_recurrent_conv_bwd`).
    dh, dh_owned = grad, False
    for k in range(t, -1, -1):
        write_ds = k > 0 or d_feed is None
        in_place = write_ds and dh_owned and dh.stride() == states[k].stride()
        ds, sum_dy[k], sum_dy_xhat[k] = passes.rc_bn_relu_bwd(
            states[k], dh, scale[k], shift[k], mean[k], rstd[k], gammas[step_norm(k, len(gammas))], d_feed,
            write_ds, ds_into_dh=in_place)
        dh = None
        if k > 0:
            dh, dw = _recurrent_conv_bwd(passes, ds, states[k - 1], scale[k - 1], shift[k - 1], w_r,
                                         overwrite=d_feed is not None)
            dh_owned = True
            d_w_r = dw if d_w_r is None else d_w_r + dw
        if d_feed is None:
            d_feed = ds  # read by the convolutions' backward above already; from now on summed into
        ds = None
    dx, d_w_f, d_b_f = _feed_conv_bwd(passes, d_feed, x, w_f, need_x)
    d_gamma, d_beta = torch.stack(sum_dy_xhat), torch.stack(sum_dy)
    if gamma.shape[0] == 1 and t > 0:  # one shared BatchNorm: the steps' gradients add up
        d_gamma, d_beta = d_gamma.sum(0, keepdim=True), d_beta.sum(0, keepdim=True)
    return dx, d_w_f, d_b_f, d_w_r, d_gamma.to(gamma.dtype), d_beta.to(gamma.dtype)


def eval_fwd(passes, x: torch.Tensor, w_f: torch.Tensor, b_f: torch.Tensor, w_r: torch.Tensor | None,
             scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor | None, t: int) -> torch.Tensor:
    """The unit in eval mode, its BatchNorms given as scale and shift (norms, C); the fused
    convolution (``rc_conv``, no statistics) where it runs, as in :func:`train_fwd`."""
    if _hook(passes, "rc_conv", x, w_f, b_f, None, None, None):
        feed = passes.rc_conv(x, w_f, b_f, None, None, None, stats=False)[0]
    else:
        feed = _conv(x, w_f, b_f)
    if t > 0 and _hook(passes, "rc_conv", feed, w_r, None, scale[0], shift[0], feed):
        s = feed
        for k in range(1, t + 1):
            prev = step_norm(k - 1, scale.shape[0])
            s = passes.rc_conv(s, w_r, None, scale[prev], shift[prev], feed, stats=False)[0]
        row = step_norm(t, scale.shape[0])
        return passes.rc_bn_relu(s, None, scale[row], shift[row], residual)
    h = passes.rc_bn_relu(feed, None, scale[0], shift[0], residual if t == 0 else None)
    for k in range(1, t + 1):
        row = step_norm(k, scale.shape[0])
        h = passes.rc_bn_relu(_conv(h, w_r, None), feed, scale[row], shift[row], residual if k == t else None)
    return h
