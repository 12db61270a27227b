"""Plain-PyTorch statements of the recurrent conv step's fused passes, computed in float64.

Each fast backend implements these three launchers (``r2unet_fast.ops.cpu`` in C++,
``r2unet_fast.ops.triton.recurrent_conv`` in Triton) with the same contract; tests compare
them with these. Tensors are (N, C, H, W), NCHW-contiguous or channels_last; per-channel
vectors are (C,). "Compute dtype" is float32 for fp16/bf16/fp32 activations, float64 for fp64.

- ``rc_add_stats(out, feed) -> (mean, var)``: in place ``out += feed`` (when ``feed`` is not
  None; same shape, dtype and layout), then the per-channel mean and *biased* variance of the
  resulting ``out`` over (N, H, W), in the compute dtype. The sums are reduced in a fixed order
  (the same bits whatever the thread count or tile) and without the cancellation of
  sum-of-squares minus squared-sum (shifted sums or Chan/Welford merges).
- ``rc_bn_relu(s, feed, scale, shift, residual) -> h``: ``relu((s + feed) * scale + shift) +
  residual`` (``feed`` and ``residual`` may be None), computed in the compute dtype, rounded
  once to ``s``'s dtype; a new tensor in ``s``'s dtype and layout. ``scale``/``shift`` are in
  the compute dtype.
- ``rc_bn_relu_bwd(s, dh, scale, shift, mean, rstd, gamma, dfeed, write_ds, ds_into_dh=False)
  -> (ds, sum_dy, sum_dy_xhat)``: the backward of ``h = relu(batch_norm(s))`` in training mode, where
  ``batch_norm(s) = s * scale + shift`` with ``scale = gamma * rstd``,
  ``shift = beta - mean * scale``. With ``dy = 0 where s * scale + shift <= 0, else dh`` (eager
  relu's rule: a NaN pre-activation passes its gradient) and
  ``xhat = (s - mean) * rstd``: ``sum_dy = sum(dy)``, ``sum_dy_xhat = sum(dy * xhat)`` per
  channel (fixed order, compute dtype) and ``ds = gamma * rstd * (dy - sum_dy / M - xhat *
  sum_dy_xhat / M)``, M = N*H*W. ``ds`` is a new tensor in ``s``'s dtype and layout when
  ``write_ds`` (else an empty tensor); when ``dfeed`` is not None, ``dfeed += ds`` in place
  (``dfeed`` in ``s``'s dtype and layout). ``sum_dy`` is beta's gradient, ``sum_dy_xhat``
  gamma's. ``ds_into_dh``: ds is written over ``dh`` (given in ``s``'s layout) and returned.
"""
from __future__ import annotations

import torch

_DIMS = (0, 2, 3)


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rc_add_stats(out: torch.Tensor, feed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if feed is not None:
        out.copy_((out.double() + feed.double()).to(out.dtype))
    s = out.double()
    mean = s.mean(_DIMS)
    var = ((s - _per_channel(mean)) ** 2).mean(_DIMS)
    return mean.to(compute_dtype(out)), var.to(compute_dtype(out))


def rc_bn_relu(s: torch.Tensor, feed: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor,
               residual: torch.Tensor | None) -> torch.Tensor:
    v = s.double() + (0 if feed is None else feed.double())
    h = torch.relu(v * _per_channel(scale.double()) + _per_channel(shift.double()))
    if residual is not None:
        h = h + residual.double()
    return h.to(s.dtype).contiguous(memory_format=_layout(s))


def rc_bn_relu_bwd(s: torch.Tensor, dh: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor, gamma: torch.Tensor, dfeed: torch.Tensor | None,
                   write_ds: bool, ds_into_dh: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sd, dhd = s.double(), dh.double()
    # threshold_backward's rule, as eager relu: the gradient passes unless the output is <= 0 (a NaN passes)
    dy = torch.where((sd * _per_channel(scale.double()) + _per_channel(shift.double())) <= 0, 0.0, dhd)
    xhat = (sd - _per_channel(mean.double())) * _per_channel(rstd.double())
    m = s.numel() // s.shape[1]
    sum_dy, sum_dy_xhat = dy.sum(_DIMS), (dy * xhat).sum(_DIMS)
    ds = _per_channel(gamma.double() * rstd.double()) * (dy - _per_channel(sum_dy) / m
                                                         - xhat * _per_channel(sum_dy_xhat) / m)
    if dfeed is not None:
        dfeed.copy_((dfeed.double() + ds).to(dfeed.dtype))
    if write_ds and ds_into_dh:
        return dh.copy_(ds), sum_dy.to(compute_dtype(s)), sum_dy_xhat.to(compute_dtype(s))
    ds_out = ds.to(s.dtype).contiguous(memory_format=_layout(s)) if write_ds else s.new_empty(0)
    return ds_out, sum_dy.to(compute_dtype(s)), sum_dy_xhat.to(compute_dtype(s))


def _layout(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
