"""Launchers of the C++ CPU kernels (``csrc/``), loaded by :mod:`.extension`.

Each launcher allocates the outputs and lets the kernel fill them. The
signatures match the Triton launchers (:mod:`r2unet_fast.ops.triton`), and
:mod:`r2unet_fast.ops.library` registers both as ``r2unet_fast::<op>_<backend>``.
Importing this module needs the kernels (prebuilt ``r2unet_fast._C`` or the first-use build);
dispatch checks that first.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .extension import load_extension
from .reference import compute_dtype

_C = load_extension()

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


def _computed(t: torch.Tensor) -> torch.Tensor:
    """bfloat16 / float16 are computed in float32 (same strides); other dtypes go to the kernel as they are."""
    return t.to(torch.float32) if t.dtype in (torch.bfloat16, torch.float16) else t


def attention_gate_kept_numel(n: int, h: int, w: int, f: int) -> int:
    """Elements of :func:`attention_gate_fwd_kept`'s third output: F values per pixel."""
    return n * h * w * f


def attention_gate_fwd_kept(x: torch.Tensor, g: torch.Tensor, w_x: torch.Tensor, w_g: torch.Tensor,
                            bias: torch.Tensor, w_psi: torch.Tensor,
                            b_psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`attention_gate_fwd` that also returns the pre-activation ``W_x x + W_g g + bias`` of
    every pixel, (N*H*W*F,) in the compute dtype, for :func:`attention_gate_bwd_kept`.

    On the CPU the gate's GEMMs, not memory traffic, decide its time, so keeping this F-channel
    buffer (as eager PyTorch does) beats recomputing it: a third less GEMM work in backward.
    """
    xc, gc = _computed(x), _computed(g)
    out = torch.empty_like(xc)
    psi = torch.empty((x.shape[0], 1, x.shape[2], x.shape[3]), dtype=xc.dtype, device=x.device)
    kept = torch.empty(attention_gate_kept_numel(x.shape[0], x.shape[2], x.shape[3], w_x.shape[0]),
                       dtype=xc.dtype, device=x.device)
    _C.attention_gate_fwd(xc, gc, w_x, w_g, bias, w_psi, b_psi, out, psi, kept)
    return out.to(x.dtype), psi.to(x.dtype), kept


def attention_gate_bwd_kept(x: torch.Tensor, g: torch.Tensor, w_x: torch.Tensor, w_g: torch.Tensor,
                            bias: torch.Tensor, w_psi: torch.Tensor, b_psi: torch.Tensor, kept: torch.Tensor,
                            grad_out: torch.Tensor, grad_psi: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor, torch.Tensor]:
    """:func:`attention_gate_bwd` reading the pre-activation from ``kept`` (the forward's third
    output, left unchanged) instead of recomputing it."""
    return _gate_bwd(x, g, w_x, w_g, bias, w_psi, b_psi, grad_out, grad_psi, kept)


def attention_gate_fwd(x: torch.Tensor, g: torch.Tensor, w_x: torch.Tensor, w_g: torch.Tensor, bias: torch.Tensor,
                       w_psi: torch.Tensor, b_psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention gate ``out = x * psi``, ``psi = sigmoid(w_psi . relu(W_x x + W_g g + bias) + b_psi)``.

    Args:
        x: (N, Cx, H, W), g: (N, Cg, H, W) CPU tensors of one dtype, both contiguous or both
            channels_last. float32/float64 natively; bfloat16/float16 computed in float32.
        w_x (F, Cx), w_g (F, Cg), bias (F,), w_psi (F,), b_psi (1,): contiguous, float32
            (float64 for float64 x).
    Returns:
        out like x (dtype and strides) and psi (N, 1, H, W) contiguous in x's dtype.
    """
    xc, gc = _computed(x), _computed(g)
    out = torch.empty_like(xc)
    psi = torch.empty((x.shape[0], 1, x.shape[2], x.shape[3]), dtype=xc.dtype, device=x.device)
    _C.attention_gate_fwd(xc, gc, w_x, w_g, bias, w_psi, b_psi, out, psi)
    return out.to(x.dtype), psi.to(x.dtype)


def attention_gate_bwd(x: torch.Tensor, g: torch.Tensor, w_x: torch.Tensor, w_g: torch.Tensor, bias: torch.Tensor,
                       w_psi: torch.Tensor, b_psi: torch.Tensor, grad_out: torch.Tensor, grad_psi: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor]:
    """Every gradient of :func:`attention_gate_fwd`; recomputes the gate from the inputs.

    Args:
        x, g, w_x, w_g, bias, w_psi, b_psi: as for :func:`attention_gate_fwd`.
        grad_out: (N, Cx, H, W) in x's dtype and memory format.
        grad_psi: (N, 1, H, W) contiguous in x's dtype, or any tensor with ``numel() == 0``
            when psi got no gradient.
    Returns:
        (dx, dg, dw_x, dw_g, dbias, dw_psi, db_psi): dx and dg like x and g, the rest like the weights.
    """
    return _gate_bwd(x, g, w_x, w_g, bias, w_psi, b_psi, grad_out, grad_psi, None)


def _gate_bwd(x: torch.Tensor, g: torch.Tensor, w_x: torch.Tensor, w_g: torch.Tensor, bias: torch.Tensor,
              w_psi: torch.Tensor, b_psi: torch.Tensor, grad_out: torch.Tensor, grad_psi: torch.Tensor,
              kept: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    xc, gc = _computed(x), _computed(g)
    dx, dg = torch.empty_like(xc), torch.empty_like(gc)
    dw_x, dw_g = torch.empty_like(w_x), torch.empty_like(w_g)
    dbias, dw_psi, db_psi = torch.empty_like(bias), torch.empty_like(w_psi), torch.empty_like(b_psi)
    gp = _computed(grad_psi) if grad_psi.numel() != 0 else None
    _C.attention_gate_bwd(xc, gc, w_x, w_g, bias, w_psi, b_psi, _computed(grad_out), gp,
                          dx, dg, dw_x, dw_g, dbias, dw_psi, db_psi, kept)
    return dx.to(x.dtype), dg.to(g.dtype), dw_x, dw_g, dbias, dw_psi, db_psi


# The recurrent conv step's passes (contracts: tests/recurrent_conv_oracle.py). The C++ kernels take
# float32 and float64; half precision runs them on float32 copies and rounds once on the way back.
def _optional(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else _computed(t)


def rc_add_stats(out: torch.Tensor, feed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """In place ``out += feed`` (unless None), then out's per-channel mean and biased variance (C,)
    over (N, H, W) in the compute dtype. out, feed: (N, C, H, W), one dtype and layout."""
    c, dtype = out.shape[1], compute_dtype(out)
    mean, var = torch.empty(c, dtype=dtype), torch.empty(c, dtype=dtype)
    if out.dtype in (torch.float32, torch.float64):
        _C.rc_add_stats(out, feed, mean, var)
    else:  # the statistics of the stored (rounded) sum, as eager BatchNorm sees it
        if feed is not None:
            out.add_(feed)
        _C.rc_add_stats(_computed(out), None, mean, var)
    return mean, var


def rc_bn_relu(s: torch.Tensor, feed: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor,
               residual: torch.Tensor | None) -> torch.Tensor:
    """``relu((s + feed) * scale + shift) + residual`` (feed, residual optional): (N, C, H, W) in s's
    dtype and layout; scale, shift (C,) in the compute dtype."""
    if s.dtype in (torch.float32, torch.float64):
        h = torch.empty_like(s)
        _C.rc_bn_relu(s, feed, scale, shift, residual, h)
        return h
    h = torch.empty_like(s, dtype=torch.float32)
    _C.rc_bn_relu(_computed(s), _optional(feed), scale, shift, _optional(residual), h)
    return h.to(s.dtype)


def rc_bn_relu_bwd(s: torch.Tensor, dh: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor, gamma: torch.Tensor, dfeed: torch.Tensor | None, write_ds: bool,
                   ds_into_dh: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of ``h = relu(s * scale + shift)`` with batch statistics: ds (s's dtype and layout;
    empty unless ``write_ds``), and sum(dy), sum(dy * xhat) (C,); ``dfeed += ds`` in place unless None.
    ``ds_into_dh``: ds overwrites ``dh`` (in s's layout, no longer needed by the caller) and is returned."""
    c, dtype = s.shape[1], compute_dtype(s)
    sum_dy, sum_dy_xhat = torch.empty(c, dtype=dtype), torch.empty(c, dtype=dtype)
    native = s.dtype in (torch.float32, torch.float64)
    ds = None
    if write_ds:
        ds = dh if ds_into_dh and native else torch.empty_like(s, dtype=s.dtype if native else torch.float32)
    acc = dfeed if native or dfeed is None else dfeed.float()
    _C.rc_bn_relu_bwd(s if native else s.float(), dh if native else dh.float(), scale, shift, mean, rstd, gamma,
                      acc, ds, sum_dy, sum_dy_xhat)
    if acc is not None and acc is not dfeed:
        dfeed.copy_(acc)
    if ds is None:
        return s.new_empty(0), sum_dy, sum_dy_xhat
    if ds_into_dh and not native:
        return dh.copy_(ds), sum_dy, sum_dy_xhat
    return ds.to(s.dtype), sum_dy, sum_dy_xhat


# Below this many channels on either side the im2col GEMM is too thin to beat oneDNN (measured at
# 16 channels, 96x96); the direct AVX2 kernel (float32) beats oneDNN at every channel count measured.
CONV3X3_WGRAD_MIN_CHANNELS = 32


def avx2_kernels() -> bool:
    """Whether the recurrent conv's C++ kernels run their AVX2 + FMA versions here: the step's
    passes, and the direct float32 weight gradient (else the im2col GEMM, as float64 always does)."""
    return bool(_C.avx2_kernels())


@contextlib.contextmanager
def baseline_kernels() -> Iterator[None]:
    """Within: the baseline kernels, as on a CPU without AVX2 (tests run both versions)."""
    _C.set_baseline_kernels(True)
    try:
        yield
    finally:
        _C.set_baseline_kernels(False)


def conv3x3_wgrad_applies(grad: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether :func:`conv3x3_wgrad` runs these tensors: float32/float64, both channels_last
    (N, C, H, W), and either float32 on the direct kernel (:func:`avx2_kernels`) or at
    least :data:`CONV3X3_WGRAD_MIN_CHANNELS` channels in and out."""
    return (grad.dtype in (torch.float32, torch.float64) and x.dtype == grad.dtype and grad.dim() == 4
            and x.dim() == 4 and grad.is_contiguous(memory_format=torch.channels_last)
            and x.is_contiguous(memory_format=torch.channels_last)
            and ((grad.dtype == torch.float32 and avx2_kernels())
                 or min(grad.shape[1], x.shape[1]) >= CONV3X3_WGRAD_MIN_CHANNELS))


def conv3x3_wgrad(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None,
                  shift: torch.Tensor | None, *, direct: bool = True, winograd: bool = True) -> torch.Tensor:
    """The weight gradient of a 3x3, stride-1, padding-1 convolution whose input is
    ``relu(x * scale + shift)`` (or ``x`` when scale and shift are None), the activation computed
    as it is loaded, never stored.

    Args:
        grad: (N, C_out, H, W), x: (N, C_in, H, W), channels_last, one dtype (float32/float64;
            :func:`conv3x3_wgrad_applies`).
        scale, shift: (C_in,) in that dtype, or both None.
        direct: float32 takes the direct kernel where the CPU has it; False forces the im2col GEMM
            (both give the same values up to rounding order).
        winograd: float32 with both channel counts multiples of 8 takes Winograd F(2x2, 3x3) where
            the CPU has AVX2 + FMA (before ``direct`` is considered); False skips it.
    Returns:
        dw (C_out, C_in, 3, 3), channels_last, in that dtype.
    """
    dw = torch.empty((grad.shape[1], x.shape[1], 3, 3), dtype=grad.dtype, memory_format=torch.channels_last)
    _C.rc_conv3x3_wgrad(grad, x, scale, shift, dw, direct, winograd)
    return dw


def rc_add_stats_affine(out: torch.Tensor, feed: torch.Tensor | None, gamma: torch.Tensor, beta: torch.Tensor,
                        row: int, eps: float, stats: torch.Tensor, step: int) -> None:
    """:func:`rc_add_stats` for one step of a unit, then that step's BatchNorm as ``s * scale + shift``,
    in one call: ``stats[:, step] = (mean, var, scale, shift, rstd)`` with gamma and beta row ``row``.

    Args:
        out, feed: as for :func:`rc_add_stats`, float32 or float64 (other dtypes take the Python route).
        gamma, beta: (norms, C) contiguous in out's dtype.
        stats: (5, steps, C) contiguous in out's dtype, written at ``[:, step]``.
    """
    _C.rc_add_stats_affine(out, feed, gamma, beta, row, eps, stats, step)


def rc_update_running_stats(stats: torch.Tensor, running_means: list[torch.Tensor], running_vars: list[torch.Tensor],
                            num_batches_tracked: list[torch.Tensor] | None, momentum: float | None,
                            count: int) -> None:
    """nn.BatchNorm2d's running-statistics update, in place, from each step's batch mean and biased
    variance (``stats`` (5, t + 1, C), rows 0 and 1), step after step: step k updates BatchNorm
    ``min(k, norms - 1)``. The running tensors: (C,) each, contiguous, in stats' dtype;
    ``num_batches_tracked``: one int64 scalar each, or None."""
    _C.rc_update_running_stats(stats, running_means, running_vars, num_batches_tracked, momentum, count)


def _winograd_applies(x: torch.Tensor, c_in: int, c_out: int) -> bool:
    return (x.dtype == torch.float32 and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and c_in % 8 == 0 and c_out % 8 == 0 and c_in > 0 and c_out > 0 and avx2_kernels())


def rc_conv_applies(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None,
                    shift: torch.Tensor | None, feed: torch.Tensor | None) -> bool:
    """Whether :func:`rc_conv` (Winograd F(2x2, 3x3), csrc/conv3x3_winograd.cpp) runs this step's
    convolution rather than oneDNN between the fused passes: float32, channels_last x (and feed),
    channels multiples of 8, an AVX2 + FMA CPU (:func:`avx2_kernels`)."""
    return (_winograd_applies(x, w.shape[1], w.shape[0]) and w.dtype == torch.float32
            and (feed is None or feed.is_contiguous(memory_format=torch.channels_last)))


def rc_conv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None,
            shift: torch.Tensor | None, feed: torch.Tensor | None,
            stats: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One step's ``s = conv3x3(relu(x * scale + shift), w) + bias + feed`` (padding 1 on the
    activation; scale/shift, bias, feed optional) in one pass, and with ``stats`` s's batch mean and
    biased variance (:func:`rc_add_stats`).

    Args:
        x: (N, C_in, H, W) float32 channels_last; w: (C_out, C_in, 3, 3) float32, any strides;
            bias (C_out,), scale and shift (C_in,) float32; feed (N, C_out, H, W) like x.
    Returns:
        s (N, C_out, H, W) channels_last, and mean, var (C_out,) (None without ``stats``).
    """
    s = torch.empty((x.shape[0], w.shape[0], x.shape[2], x.shape[3]), dtype=x.dtype,
                    memory_format=torch.channels_last)
    _C.rc_conv3x3_winograd(x, w, bias, scale, shift, feed, s, False)
    if not stats:
        return s, None, None
    mean, var = rc_add_stats(s, None)
    return s, mean, var


def conv3x3_dgrad_applies(grad: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`conv3x3_dgrad` (Winograd) runs this input gradient rather than oneDNN: as
    :func:`rc_conv_applies`, grad taking the input's place."""
    return _winograd_applies(grad, w.shape[0], w.shape[1]) and w.dtype == torch.float32


def conv3x3_dgrad(grad: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The input gradient of a 3x3, stride-1, padding-1 convolution: the forward convolution of
    ``grad`` with the rotated, transposed filters, by Winograd F(2x2, 3x3).

    Args:
        grad: (N, C_out, H, W) float32 channels_last; w: (C_out, C_in, 3, 3) float32.
    Returns:
        dx (N, C_in, H, W) channels_last.
    """
    dx = torch.empty((grad.shape[0], w.shape[1], grad.shape[2], grad.shape[3]), dtype=grad.dtype,
                     memory_format=torch.channels_last)
    _C.rc_conv3x3_winograd(grad, w, None, None, None, None, dx, True)
    return dx
