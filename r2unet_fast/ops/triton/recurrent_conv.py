"""Launchers of the recurrent conv step's fused passes (kernels and their scheme:
:mod:`.recurrent_conv_kernels`).

``rc_add_stats`` (two launches), ``rc_bn_relu`` (one) and ``rc_bn_relu_bwd`` (three, or two
without ds and dfeed) take and return what ``tests/recurrent_conv_oracle.py`` states, for
NCHW-contiguous and channels_last activations of fp16, bf16, fp32 or fp64. They validate
their inputs (metadata only) and raise ValueError naming the offending argument.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
import triton

from .._checks import check_ndim, check_same_device, check_shape
from ..library import dense_layout
from ..reference import compute_dtype
from . import conv3x3, tuning
from .attention_gate import _strides
from .hybrid_loss import MAX_GRID_1, PROGRAMS_PER_SM, _configs, _device_guard, _sm_count
from .recurrent_conv_kernels import (_add_stats_kernel, _bn_relu_kernel, _bwd_apply_kernel, _bwd_reduce_kernel,
                                     _stats_merge_kernel, _sums_merge_kernel)

# The channel block of every activation kernel, clipped to the next power of two >= MIN_BLOCK_C
# of C. In the reducing kernels it shapes the tile whose tl.sum order is fixed, so it is
# never autotuned.
CHANNEL_TILES: dict[str, tuning.Tile] = {"default": {"BLOCK_C": 32}}
MIN_BLOCK_C: int = 4
# The reducing kernels (add_stats, bwd_reduce): BLOCK_M and num_warps fix the order of their sums.
REDUCTION_TILES: dict[str, tuning.Tile] = {"default": {"BLOCK_M": 64, "num_warps": 4}}
# Elementwise kernels (bn_relu, bwd_apply) tune their pixel tile freely. First entry: the default.
PIXEL_TILES: list[tuning.Tile] = [{"BLOCK_M": m, "num_warps": w} for m, w in
                                  ((64, 4), (128, 4), (128, 8), (256, 8), (32, 4))]
# Committed winners {(arch, kernel, bucket of C*H*W, dtype): tile}, kernel one of "add_stats",
# "bn_relu", "bwd_reduce", "bwd_apply"; none measured yet.
TUNED_TILES: dict[tuning.CommittedKey, tuning.Tile] = {}
# Channels per program of the merge kernels, which add rows in order per channel (any block
# gives the same bits).
MERGE_BLOCK_C: int = 128
# Programs per image and channel block the reducing kernels aim for under the interpreter.
INTERPRETER_PROGRAMS: int = 4
ACTIVATION_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _stage_choices() -> tuple[int | None, ...]:
    return (2,) if tuning.interpreting() else (1, 2, 3)


def _fixed_tuner(kernel):
    return lambda arch: triton.autotune(configs=_configs([tuning.per_arch(REDUCTION_TILES, arch)], _stage_choices()),
                                        key=["numel_bucket"])(kernel)


def _free_tuner(kernel):
    return lambda arch: triton.autotune(configs=_configs(PIXEL_TILES, _stage_choices()), key=["numel_bucket"])(kernel)


_add_stats_tuners = tuning.PerArch("add_stats", _fixed_tuner(_add_stats_kernel))
_bn_relu_tuners = tuning.PerArch("bn_relu", _free_tuner(_bn_relu_kernel))
_bwd_reduce_tuners = tuning.PerArch("bwd_reduce", _fixed_tuner(_bwd_reduce_kernel))
_bwd_apply_tuners = tuning.PerArch("bwd_apply", _free_tuner(_bwd_apply_kernel))


def _launch(name: str, tuners: tuning.PerArch, kernel, x: torch.Tensor, grid, *args, fixed: bool, **meta) -> None:
    """Launch ``kernel`` (``name`` in TUNED_TILES keys) for activations like ``x``: its committed or
    default tile, or its autotuner; a reducing kernel (``fixed``) always gets the reduction tile."""
    arch = tuning.arch(x.device)
    key = (arch, name, tuning.bucket(x.numel() // x.shape[0]), tuning.dtype_name(x.dtype))
    reduction = tuning.per_arch(REDUCTION_TILES, arch) if fixed else None
    tile = tuning.launch_config(TUNED_TILES, key, {} if fixed else PIXEL_TILES[0], fixed=reduction)
    kernel = tuners(arch) if tile is None else kernel
    tuning.wrap(kernel)[grid](*args, key[2], **meta, **(tile or {}))


def _block_c(x: torch.Tensor) -> int:
    limit = tuning.per_arch(CHANNEL_TILES, tuning.arch(x.device))["BLOCK_C"]
    return max(MIN_BLOCK_C, min(limit, triton.next_power_of_2(int(x.shape[1]))))


def _pixel_grid(n: int, hw: int, c: int, block_c: int):
    def grid(meta: dict) -> tuple[int, int, int]:
        return (n, min(triton.cdiv(hw, meta["BLOCK_M"]), MAX_GRID_1), min(triton.cdiv(c, block_c), MAX_GRID_1))
    return grid


def _chunk_grid(n: int, chunks: int, c: int, block_c: int) -> tuple[int, int, int]:
    return n, chunks, min(triton.cdiv(c, block_c), MAX_GRID_1)


def _chunking(x: torch.Tensor, block_c: int) -> tuple[int, int]:
    """(chunk_size, chunks) per image for the reducing kernels, whole tiles each, so the grid fills
    the device; from the shape and device only, so the order of the sums is too."""
    n, c, h, w = x.shape
    block_m = tuning.per_arch(REDUCTION_TILES, tuning.arch(x.device))["BLOCK_M"]
    target = PROGRAMS_PER_SM * _sm_count(x.device) if x.device.type == "cuda" else INTERPRETER_PROGRAMS
    wanted = max(1, triton.cdiv(target, n * triton.cdiv(c, block_c)))
    chunks = min(triton.cdiv(h * w, block_m), wanted, MAX_GRID_1)
    chunk_size = triton.cdiv(triton.cdiv(h * w, chunks), block_m) * block_m
    return chunk_size, triton.cdiv(h * w, chunk_size)


def _check_activations(name: str, x: torch.Tensor, **others: torch.Tensor | None) -> None:
    """x: a non-empty dense (N, C, H, W) tensor of an activation dtype; ``others`` (None: absent)
    of x's shape, dtype and device, each dense in either memory format."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_ndim(name, x, 4, "(N, C, H, W)")
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} has no elements (shape {tuple(x.shape)}): no batch statistics to take")
    present = {k: t for k, t in others.items() if t is not None}
    for other, t in present.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{other} must be a torch.Tensor or None, got {type(t).__name__}")
    check_same_device(**{name: x}, **present)
    for other, t in {name: x, **present}.items():
        check_shape(other, t, tuple(x.shape))
        if t.dtype != x.dtype:
            raise ValueError(f"{other} must have {name}'s dtype {x.dtype}, got {t.dtype}")
        if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
            raise ValueError(f"{other} must be NCHW-contiguous or channels_last, got strides {t.stride()}")


def _check_channel_vectors(name: str, x: torch.Tensor, **vectors: torch.Tensor) -> None:
    """Each vector: (C,) contiguous, in x's compute dtype, on x's device."""
    acc = compute_dtype(x)
    for vname, v in vectors.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{vname} must be a torch.Tensor, got {type(v).__name__}")
    check_same_device(**{name: x}, **vectors)
    for vname, v in vectors.items():
        check_shape(vname, v, (x.shape[1],))
        if v.dtype != acc:
            raise ValueError(f"{vname} must be in the compute dtype {acc} of {x.dtype} activations, got {v.dtype}")
        if not v.is_contiguous():
            raise ValueError(f"{vname} must be contiguous, got stride {v.stride()}")


def rc_add_stats(out: torch.Tensor, feed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``out += feed`` in place (when feed is given), then out's per-channel batch statistics.

    Args:
        out: (N, C, H, W) fp16/bf16/fp32/fp64, NCHW-contiguous or channels_last; modified in place
            when ``feed`` is given (the sum rounded once to out's dtype).
        feed: like out (shape, dtype, device; either layout), or None.
    Returns:
        (mean, var): (C,) each in the compute dtype, of the stored out over (N, H, W); var biased.
    """
    _check_activations("out", out, feed=feed)
    n, c, h, w = out.shape
    acc = compute_dtype(out)
    block_c = _block_c(out)
    chunk_size, chunks = _chunking(out, block_c)
    partials = torch.empty((n * chunks, 3, c), dtype=acc, device=out.device)
    mean = torch.empty((c,), dtype=acc, device=out.device)
    var = torch.empty((c,), dtype=acc, device=out.device)
    has_feed = feed is not None
    src = feed if has_feed else out  # without feed its pointer is never read
    with _device_guard(out.device):
        _launch("add_stats", _add_stats_tuners, _add_stats_kernel, out, _chunk_grid(n, chunks, c, block_c),
                out, src, partials, h * w, c, chunk_size, *_strides(out), *_strides(src),
                fixed=True, HAS_FEED=has_feed, BLOCK_C=block_c)
        tuning.wrap(_stats_merge_kernel)[(triton.cdiv(c, MERGE_BLOCK_C),)](
            partials, mean, var, h * w, c, chunk_size, chunks, n * chunks, BLOCK_C=MERGE_BLOCK_C, num_warps=4)
    return mean, var


def rc_bn_relu(s: torch.Tensor, feed: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor,
               residual: torch.Tensor | None) -> torch.Tensor:
    """``relu((s + feed) * scale + shift) + residual``, in the compute dtype, rounded once.

    Args:
        s: (N, C, H, W) fp16/bf16/fp32/fp64, NCHW-contiguous or channels_last.
        feed, residual: like s (shape, dtype, device; either layout), or None.
        scale, shift: (C,) contiguous, in the compute dtype.
    Returns:
        h: a new tensor in s's dtype and layout.
    """
    _check_activations("s", s, feed=feed, residual=residual)
    _check_channel_vectors("s", s, scale=scale, shift=shift)
    n, c, hh, ww = s.shape
    h = torch.empty_like(s)
    feed_arg = feed if feed is not None else s  # absent inputs: s stands in, never read
    res_arg = residual if residual is not None else s
    block_c = _block_c(s)
    with _device_guard(s.device):
        _launch("bn_relu", _bn_relu_tuners, _bn_relu_kernel, s, _pixel_grid(n, hh * ww, c, block_c),
                s, feed_arg, res_arg, scale, shift, h, hh * ww, c, *_strides(s), *_strides(feed_arg),
                *_strides(res_arg), *_strides(h), fixed=False, HAS_FEED=feed is not None,
                HAS_RESIDUAL=residual is not None, BLOCK_C=block_c)
    return h


def rc_bn_relu_bwd(s: torch.Tensor, dh: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor, gamma: torch.Tensor, dfeed: torch.Tensor | None, write_ds: bool,
                   ds_into_dh: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of ``h = relu(batch_norm(s))`` in training mode, with batch statistics.

    Args:
        s: (N, C, H, W) fp16/bf16/fp32/fp64, NCHW-contiguous or channels_last.
        dh: like s (shape, dtype, device; either layout).
        scale, shift, mean, rstd, gamma: (C,) contiguous in the compute dtype
            (``scale = gamma * rstd``, ``shift = beta - mean * scale``).
        dfeed: like s, or None; when given, ``dfeed += ds`` in place (rounded once).
        write_ds: whether to return ds.
        ds_into_dh: ds overwrites ``dh`` (which the caller no longer needs): each element of dh is
            read and then written by the same program, after the reduction has read all of it.
    Returns:
        (ds, sum_dy, sum_dy_xhat): ds a new tensor in s's dtype and layout, or ``dh`` itself when
        ``ds_into_dh`` (an empty tensor when not ``write_ds``); beta's and gamma's gradients, (C,)
        each in the compute dtype.
    """
    _check_activations("s", s, dh=dh, dfeed=dfeed)
    _check_channel_vectors("s", s, scale=scale, shift=shift, mean=mean, rstd=rstd, gamma=gamma)
    n, c, h, w = s.shape
    acc = compute_dtype(s)
    block_c = _block_c(s)
    chunk_size, chunks = _chunking(s, block_c)
    partials = torch.empty((n * chunks, 2, c), dtype=acc, device=s.device)
    sum_dy = torch.empty((c,), dtype=acc, device=s.device)
    sum_dy_xhat = torch.empty((c,), dtype=acc, device=s.device)
    ds = (dh if ds_into_dh else torch.empty_like(s)) if write_ds else s.new_empty(0)
    with _device_guard(s.device):
        _launch("bwd_reduce", _bwd_reduce_tuners, _bwd_reduce_kernel, s, _chunk_grid(n, chunks, c, block_c),
                s, dh, scale, shift, mean, rstd, partials, h * w, c, chunk_size, *_strides(s), *_strides(dh),
                fixed=True, BLOCK_C=block_c)
        tuning.wrap(_sums_merge_kernel)[(triton.cdiv(c, MERGE_BLOCK_C),)](
            partials, sum_dy, sum_dy_xhat, c, n * chunks, BLOCK_C=MERGE_BLOCK_C, num_warps=4)
        if write_ds or dfeed is not None:
            ds_arg = ds if write_ds else s  # absent outputs: s stands in, never written
            dfeed_arg = dfeed if dfeed is not None else s
            _launch("bwd_apply", _bwd_apply_tuners, _bwd_apply_kernel, s, _pixel_grid(n, h * w, c, block_c),
                    s, dh, scale, shift, mean, rstd, gamma, sum_dy, sum_dy_xhat, ds_arg, dfeed_arg, h * w, c, n * h * w,
                    *_strides(s), *_strides(dh), *_strides(ds_arg), *_strides(dfeed_arg), fixed=False,
                    WRITE_DS=write_ds, HAS_DFEED=dfeed is not None, BLOCK_C=block_c)
    return ds, sum_dy, sum_dy_xhat


def tuned_configs() -> dict[str, list[dict[str, object]]]:
    """What autotuning chose so far per kernel (``numel_per_image`` is the bucket of C*H*W), in
    the form :data:`TUNED_TILES` takes; see :func:`.hybrid_loss.tuned_configs`."""
    return {t.name: t.winners() for t in (_add_stats_tuners, _bn_relu_tuners, _bwd_reduce_tuners, _bwd_apply_tuners)}


def _aten_conv_stats(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None,
                     shift: torch.Tensor | None, feed: torch.Tensor | None) -> torch.Tensor:
    # what the unfused step does for one convolution: the activation pass, cuDNN, the add + statistics pass
    a = x if scale is None else rc_bn_relu(x, None, scale, shift, None)
    out = F.conv2d(a, w, bias, padding=1)
    rc_add_stats(out, feed)
    return out


def rc_conv_applies(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None,
                    shift: torch.Tensor | None, feed: torch.Tensor | None) -> bool:
    """Whether the step's convolution of x (with these prologue and epilogue inputs, as
    :func:`rc_conv` takes them) runs on the fused implicit-GEMM kernel rather than cuDNN plus the
    separate passes (:func:`.conv3x3.choose`, kind "fwd")."""
    def candidates() -> dict[str, Callable[[], object]]:
        return {"triton": lambda: conv3x3.conv3x3(x, w, bias, scale, shift, feed, stats=True),
                "aten": lambda: _aten_conv_stats(x, w, bias, scale, shift, feed)}
    return conv3x3.choose("fwd", x, x.shape[1], w.shape[0], candidates) == "triton"


def rc_conv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None,
            shift: torch.Tensor | None, feed: torch.Tensor | None,
            stats: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One step's ``s = conv3x3(relu(x * scale + shift)) + bias + feed`` and its batch statistics in
    one launch (and the merge): :func:`.conv3x3.conv3x3`."""
    return conv3x3.conv3x3(x, w, bias, scale, shift, feed, stats=stats)


def conv3x3_wgrad_applies(grad: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether :func:`conv3x3_wgrad` (Triton, prologue recomputed on load) runs these tensors rather
    than a BatchNorm + ReLU pass and cuDNN's weight gradient (kind "wgrad")."""
    def candidates() -> dict[str, Callable[[], object]]:
        ones = torch.ones(x.shape[1], dtype=compute_dtype(x), device=x.device)
        zeros = torch.zeros_like(ones)
        w = x.new_empty(grad.shape[1], x.shape[1], 3, 3)

        def aten() -> torch.Tensor:
            h = rc_bn_relu(x, None, ones, zeros, None)
            return torch.ops.aten.convolution_backward(grad, h, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                       [False, True, False])[1]
        return {"triton": lambda: conv3x3.conv3x3_wgrad(grad, x, ones, zeros), "aten": aten}
    return conv3x3.choose("wgrad", x, x.shape[1], grad.shape[1], candidates) == "triton"


conv3x3_wgrad = conv3x3.conv3x3_wgrad


def conv3x3_dgrad_applies(grad: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`conv3x3_dgrad` (Triton) runs the input gradient rather than cuDNN (kind "dgrad")."""
    def candidates() -> dict[str, Callable[[], object]]:
        n, _, h, ww = grad.shape
        like = torch.empty((n, w.shape[1], h, ww), dtype=grad.dtype, device=grad.device,
                           memory_format=dense_layout(grad))

        def aten() -> torch.Tensor:
            return torch.ops.aten.convolution_backward(grad, like, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                       [True, False, False])[0]
        return {"triton": lambda: conv3x3.conv3x3_dgrad(grad, w), "aten": aten}
    return conv3x3.choose("dgrad", grad, w.shape[1], w.shape[0], candidates) == "triton"


conv3x3_dgrad = conv3x3.conv3x3_dgrad
