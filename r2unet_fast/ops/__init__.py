"""Public ops. Each validates its inputs, then runs the backend that
:func:`r2unet_fast.ops.dispatch.resolve` picks; results do not depend on it."""
from __future__ import annotations

import torch

from . import dispatch
from ._checks import check_finite_number, check_floating, check_ndim, check_same_device, check_shape
from .dispatch import BACKEND_CHOICES, BACKENDS, available_backends

__all__ = ["hybrid_loss", "attention_gate", "recurrent_conv", "available_backends", "BACKENDS", "BACKEND_CHOICES"]


def hybrid_loss(logits: torch.Tensor, target: torch.Tensor, *, dice_weight: float = 0.5,
                bce_weight: float = 0.5, pos_weight: float = 1.0, smooth: float = 1.0,
                per_image: bool = True, backend: str = "auto") -> torch.Tensor:
    """``bce_weight * BCE(pos_weight) + dice_weight * (1 - Dice)`` (docs/design.md section 2).

    Args:
        logits: (N, 1, H, W) float (fp32/bf16/fp16/fp64), any memory layout.
        target: same shape, values in [0, 1]; soft targets allowed.
        per_image: Dice per image then mean over images; False pools the batch.
    Returns:
        0-d tensor: float64 for float64 logits, else float32.
    """
    check_floating(logits=logits, target=target)
    device = check_same_device(logits=logits, target=target)
    if logits.dim() < 2:
        raise ValueError(f"logits must be (N, 1, H, W), got shape {tuple(logits.shape)}")
    check_shape("target", target, tuple(logits.shape))
    if logits.shape[0] == 0 or logits.numel() == 0:
        raise ValueError(f"hybrid_loss needs a non-empty batch, got shape {tuple(logits.shape)}")
    weights = dict(
        dice_weight=check_finite_number("dice_weight", dice_weight, minimum=0.0),
        bce_weight=check_finite_number("bce_weight", bce_weight, minimum=0.0),
        pos_weight=check_finite_number("pos_weight", pos_weight, minimum=0.0),
        smooth=check_finite_number("smooth", smooth, minimum=0.0),
    )
    impl = dispatch.kernel("hybrid_loss", backend, device)
    return impl(logits, target, per_image=bool(per_image), **weights)


def attention_gate(x: torch.Tensor, g: torch.Tensor, w_x: torch.Tensor, w_g: torch.Tensor,
                   bias: torch.Tensor, w_psi: torch.Tensor, b_psi: torch.Tensor, *,
                   return_psi: bool = False,
                   backend: str = "auto") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Additive attention gate (docs/design.md section 1), ``out = x * psi``.

    Args:
        x: (N, Cx, H, W) skip feature; g: (N, Cg, H, W) up-sampled decoder feature.
        w_x: (F, Cx); w_g: (F, Cg); bias: (F,); w_psi: (F,); b_psi: (1,).
    Returns:
        out (N, Cx, H, W) and, with ``return_psi``, psi (N, 1, H, W).
    """
    tensors = dict(x=x, g=g, w_x=w_x, w_g=w_g, bias=bias, w_psi=w_psi, b_psi=b_psi)
    check_floating(**tensors)
    device = check_same_device(**tensors)
    check_ndim("x", x, 4, "(N, Cx, H, W)")
    check_ndim("g", g, 4, "(N, Cg, H, W)")
    n, cx, h, w = x.shape
    if g.dtype != x.dtype:
        if not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"x and g must have one dtype, got x {x.dtype} and g {g.dtype}")
        # under autocast the reference's 1x1 convolutions would run in the autocast dtype
        dtype = torch.get_autocast_dtype(x.device.type)
        x, g = x.to(dtype), g.to(dtype)
    if g.shape[0] != n or g.shape[2:] != x.shape[2:]:
        raise ValueError(f"g must match x in batch and spatial size: x {tuple(x.shape)}, g {tuple(g.shape)}")
    check_ndim("w_x", w_x, 2, "(F, Cx)")
    f = w_x.shape[0]
    if f == 0:
        raise ValueError(f"the gate needs at least one intermediate channel, got w_x of shape {tuple(w_x.shape)}")
    check_shape("w_x", w_x, (f, cx))
    check_shape("w_g", w_g, (f, g.shape[1]))
    check_shape("bias", bias, (f,))
    check_shape("w_psi", w_psi, (f,))
    check_shape("b_psi", b_psi, (1,))
    if x.numel() == 0 or g.numel() == 0:
        raise ValueError(f"attention_gate needs non-empty inputs, got x {tuple(x.shape)}, g {tuple(g.shape)}")
    impl = dispatch.kernel("attention_gate", backend, device)
    return impl(x, g, w_x, w_g, bias, w_psi, b_psi, return_psi=return_psi)


def recurrent_conv(x: torch.Tensor, w_f: torch.Tensor, b_f: torch.Tensor, w_r: torch.Tensor | None,
                   gammas: list[torch.Tensor], betas: list[torch.Tensor], running_means: list[torch.Tensor],
                   running_vars: list[torch.Tensor], num_batches_tracked: list[torch.Tensor] | None = None, *,
                   t: int, training: bool, momentum: float | None = 0.1, eps: float = 1e-5,
                   residual: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """The recurrent convolutional unit with BatchNorm (docs/design.md section 1), updating the running
    statistics in training mode exactly as ``nn.BatchNorm2d``; see
    :func:`r2unet_fast.ops.reference.recurrent_conv`.

    Args:
        x: (N, Cin, H, W); w_f: (C, Cin, 3, 3); b_f: (C,); w_r: (C, C, 3, 3) (``w_f`` itself when tied),
            or None when t = 0 (conv + BN + ReLU: no recurrent convolution runs).
        gammas, betas, running_means, running_vars (and num_batches_tracked, 0-d): one per BatchNorm,
            1 (shared by every step) or t + 1.
        residual: (N, C, H, W) added to the output (the RRCU block's x0), or None.
    Returns:
        (N, C, H, W) in x's dtype and layout.
    """
    if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        raise ValueError(f"t (recurrent steps) must be an int >= 0, got {t!r}")
    if w_r is None and t > 0:
        raise ValueError(f"w_r (the recurrent weight, (C, C, 3, 3)) is needed for t = {t} > 0; only t = 0 "
                         "(conv + BN + ReLU) runs without it")
    weights = dict(w_f=w_f, b_f=b_f) if w_r is None else dict(w_f=w_f, b_f=b_f, w_r=w_r)
    check_floating(x=x, **weights)
    device = check_same_device(x=x, **weights, **{f"gammas[{i}]": g for i, g in enumerate(gammas)})
    check_ndim("x", x, 4, "(N, Cin, H, W)")
    check_ndim("w_f", w_f, 4, "(C, Cin, 3, 3)")
    c = w_f.shape[0]
    check_shape("w_f", w_f, (c, x.shape[1], 3, 3))
    check_shape("b_f", b_f, (c,))
    if w_r is not None:
        check_shape("w_r", w_r, (c, c, 3, 3))
    norms = len(gammas)
    if norms not in (1, t + 1):
        raise ValueError(f"one BatchNorm shared by every step or one per step (t + 1 = {t + 1}), got {norms}")
    for name, values in (("betas", betas), ("running_means", running_means), ("running_vars", running_vars)):
        if len(values) != norms:
            raise ValueError(f"{name} must have one entry per BatchNorm ({norms}), got {len(values)}")
    for name, values in (("gammas", gammas), ("betas", betas), ("running_means", running_means),
                         ("running_vars", running_vars)):
        for i, v in enumerate(values):
            check_shape(f"{name}[{i}]", v, (c,))
    if residual is not None:
        check_shape("residual", residual, (x.shape[0], c, x.shape[2], x.shape[3]))
    if x.numel() == 0:
        raise ValueError(f"recurrent_conv needs a non-empty input, got x of shape {tuple(x.shape)}")
    if training and x.shape[0] * x.shape[2] * x.shape[3] < 2:
        raise ValueError(f"BatchNorm in training mode needs more than one value per channel, got x {tuple(x.shape)}")
    if x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        # Eager autocast runs the 3x3 convolutions in the autocast dtype, so a float32 input (the
        # U-Net's first layer takes the image) is cast as it would; the op's own convolutions then
        # see one dtype, forward and backward.
        x = x.to(torch.get_autocast_dtype(x.device.type))
    impl = dispatch.kernel("recurrent_conv", backend, device)
    return impl(x, w_f, b_f, w_r, list(gammas), list(betas), list(running_means), list(running_vars),
                None if num_batches_tracked is None else list(num_batches_tracked), t=t, training=training,
                momentum=momentum, eps=eps, residual=residual)
