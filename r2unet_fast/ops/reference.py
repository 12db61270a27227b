"""Pure-PyTorch reference ops: the single source of truth every fast path is checked against.

Float64-safe (gradcheck runs on these). Half-precision inputs are computed in
float32, as autocast does for losses, so the reference in bf16/fp16 measures
the cost of rounding the inputs, not of accumulating in half precision.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype every op computes and returns in for input ``t``: float64 stays, the rest is float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def softplus_neg(x: torch.Tensor) -> torch.Tensor:
    """``-log(sigmoid(x)) = log(1 + exp(-x))`` without overflow or a log of a sigmoid.

    ``log_sigmoid`` rather than ``relu(-x) + log1p(exp(-|x|))``: the latter's
    autograd gradient is 0 at exactly x = 0 (both kinks), where it must be -1/2.
    """
    return -F.logsigmoid(x)


def hybrid_loss_sums(logits: torch.Tensor, target: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    """Per-image sums the loss is made of.

    Args:
        logits: (N, ...) any float dtype.
        target: same shape, values in [0, 1].
    Returns:
        (N, 4) in float32 (float64 for float64 input): sum(p*t), sum(p), sum(t),
        sum of per-pixel weighted BCE.
    """
    dtype = compute_dtype(logits)
    n = logits.shape[0]
    x = logits.reshape(n, -1).to(dtype)
    t = target.reshape(n, -1).to(dtype)
    p = torch.sigmoid(x)
    # -(w t log p + (1-t) log(1-p)) = (1-t) x + (w t + 1 - t) softplus(-x)
    bce = (1 - t) * x + (pos_weight * t + 1 - t) * softplus_neg(x)
    return torch.stack([(p * t).sum(1), p.sum(1), t.sum(1), bce.sum(1)], dim=1)


def loss_from_sums(sums: torch.Tensor, numel: int, *, dice_weight: float, bce_weight: float,
                   smooth: float, per_image: bool) -> torch.Tensor:
    """Combine (N, 4) per-image sums into the scalar hybrid loss (``numel`` = all pixels)."""
    inter, psum, tsum, bce_sum = sums.unbind(1)
    if per_image:
        dice = ((2 * inter + smooth) / (psum + tsum + smooth)).mean()
    else:
        dice = (2 * inter.sum() + smooth) / (psum.sum() + tsum.sum() + smooth)
    return bce_weight * (bce_sum.sum() / numel) + dice_weight * (1 - dice)


def hybrid_loss(logits: torch.Tensor, target: torch.Tensor, *, dice_weight: float = 0.5,
                bce_weight: float = 0.5, pos_weight: float = 1.0, smooth: float = 1.0,
                per_image: bool = True) -> torch.Tensor:
    """Dice + weighted BCE of docs/design.md section 2, stable in logits.

    Args:
        logits: (N, 1, H, W) (any (N, ...) works), float.
        target: same shape, in [0, 1] (soft targets allowed).
    Returns:
        0-d tensor, float32 (float64 for float64 logits).
    """
    sums = hybrid_loss_sums(logits, target, pos_weight)
    return loss_from_sums(sums, logits.numel(), dice_weight=dice_weight, bce_weight=bce_weight,
                          smooth=smooth, per_image=per_image)


def attention_gate(x: torch.Tensor, g: torch.Tensor, w_x: torch.Tensor, w_g: torch.Tensor,
                   bias: torch.Tensor, w_psi: torch.Tensor, b_psi: torch.Tensor, *,
                   return_psi: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Additive attention gate: ``psi = sigmoid(w_psi . relu(W_x x + W_g g + b) + b_psi)``, ``out = x * psi``.

    Args:
        x: (N, Cx, H, W) skip feature; g: (N, Cg, H, W) gating feature.
        w_x: (F, Cx); w_g: (F, Cg); bias: (F,); w_psi: (F,); b_psi: (1,).
    Returns:
        out (N, Cx, H, W), and psi (N, 1, H, W) when ``return_psi``.
    """
    a = F.conv2d(x, w_x[:, :, None, None]) + F.conv2d(g, w_g[:, :, None, None], bias)
    q = F.conv2d(torch.relu(a), w_psi.reshape(1, -1, 1, 1), b_psi)
    psi = torch.sigmoid(q)
    out = x * psi
    return (out, psi) if return_psi else out


def recurrent_conv(x: torch.Tensor, w_f: torch.Tensor, b_f: torch.Tensor, w_r: torch.Tensor | None,
                   gammas: list[torch.Tensor], betas: list[torch.Tensor], running_means: list[torch.Tensor],
                   running_vars: list[torch.Tensor], num_batches_tracked: list[torch.Tensor] | None, *, t: int,
                   training: bool, momentum: float | None = 0.1, eps: float = 1e-5,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """The recurrent convolutional unit with BatchNorm, as ``nn.BatchNorm2d`` runs it.

    ``F = conv_f(x) + b_f``, ``s_0 = F``, ``s_k = F + conv(h_{k-1}, w_r)``, ``h_k = relu(bn_k(s_k))``;
    returns ``h_t`` (+ ``residual``). BatchNorm ``k`` is entry ``min(k, len(gammas) - 1)`` of the lists
    (one entry: shared by every step). In training mode each BatchNorm call uses batch statistics and
    updates its running statistics in place (and ``num_batches_tracked``; ``momentum=None``: the
    cumulative average), exactly as ``nn.BatchNorm2d``.

    Args:
        x: (N, Cin, H, W); w_f: (C, Cin, 3, 3); b_f: (C,); w_r: (C, C, 3, 3) (``w_f`` when tied), or None
            at t = 0 (conv + BN + ReLU; raises ValueError for t > 0).
        gammas, betas, running_means, running_vars, num_batches_tracked: one (C,) (counts: 0-d) per BatchNorm.
    Returns:
        (N, C, H, W).
    """
    if w_r is None and t > 0:
        raise ValueError(f"w_r (the recurrent weight) is needed for t = {t} > 0")
    feed = F.conv2d(x, w_f, b_f, padding=1)

    def norm(k: int, s: torch.Tensor) -> torch.Tensor:
        i = min(k, len(gammas) - 1)
        factor = momentum
        if training and num_batches_tracked is not None:
            num_batches_tracked[i].add_(1)
            if momentum is None:
                factor = 1.0 / float(num_batches_tracked[i])
        return F.batch_norm(s, running_means[i], running_vars[i], gammas[i], betas[i], training, factor or 0.0, eps)

    h = torch.relu(norm(0, feed))
    for k in range(1, t + 1):
        h = torch.relu(norm(k, feed + F.conv2d(h, w_r, padding=1)))
    return h if residual is None else h + residual
