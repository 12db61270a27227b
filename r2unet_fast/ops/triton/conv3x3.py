"""Launchers of the implicit-GEMM 3x3 convolution (kernels: :mod:`.conv3x3_kernels`) and the
per-shape choice between it and cuDNN.

``conv3x3`` (forward, with the recurrent step's BatchNorm + ReLU prologue and its add +
statistics epilogue), ``conv3x3_dgrad`` and ``conv3x3_wgrad`` (with the prologue recomputed) take
NCHW-contiguous or channels_last activations of fp16, bf16, fp32 or fp64 and validate their
inputs (metadata only), raising ValueError naming the offending argument.

Which convolution runs (:func:`choose`): on a GPU, the faster of this kernel and cuDNN's for each
shape, measured at first use as ``cudnn.benchmark`` does (each side's whole work: cuDNN's path
includes the separate BatchNorm + ReLU and add + statistics passes the fused kernel saves), or
taken from :data:`CONV_CHOICES` committed from ``benchmarks/gpu_report.py``. A shape first met
while compiling or capturing a CUDA graph, where nothing can be timed, takes cuDNN, the known
path. Under the interpreter the Triton kernel runs (that is what the tests check), and
``R2UNET_FAST_CONV3X3=triton|aten`` (or :func:`forced`) fixes the choice everywhere.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch
import triton

from .._checks import check_ndim, check_same_device, check_shape
from ..library import dense_layout
from ..reference import compute_dtype
from . import tuning
from .attention_gate import _dot_flags
from .hybrid_loss import MAX_GRID_1, PROGRAMS_PER_SM, _device_guard, _sm_count
from .conv3x3_kernels import _conv3x3_fwd_kernel, _conv3x3_wgrad_kernel
from .recurrent_conv_kernels import _stats_merge_kernel

ACTIVATION_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Tiles per architecture. BLOCK_M (pixels per program) fixes the statistics' partial rows and
# BLOCK_K the order of each output's sum, so they are committed, never autotuned; the channel
# blocks are clipped to the channel counts (at least 16, tl.dot's smallest). The interpreter's
# cost is per program and per operation, not per element, so its tiles are large too; the
# kernel tests shrink them to reach every remainder.
CONV_TILES: dict[str, tuning.Tile] = {
    "default": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
    tuning.INTERPRETER_ARCH: {"BLOCK_M": 256, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4},
}
WGRAD_TILES: dict[str, tuning.Tile] = {
    "default": {"BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    tuning.INTERPRETER_ARCH: {"BLOCK_P": 256, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4},
}
MIN_BLOCK: int = 16
MERGE_BLOCK_C: int = 128
# Pixel splits of the weight gradient under the interpreter (on a GPU: enough to fill it).
INTERPRETER_SPLITS: int = 2
IMPLS: tuple[str, ...] = ("triton", "aten")
ChoiceKey = tuple[str, str, int, int, int, str]  # (arch, kind, C_in, C_out, bucket of H*W*N, dtype)
# Committed choices {key: impl}, kind "fwd" (with prologue and statistics), "dgrad" or "wgrad";
# none measured yet: a GPU measures each shape at first use.
CONV_CHOICES: dict[ChoiceKey, str] = {}
_MEASURED: dict[ChoiceKey, str] = {}
_FORCED: list[str | None] = [os.environ.get("R2UNET_FAST_CONV3X3") or None]


def _validate_impl(impl: str | None) -> str | None:
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"R2UNET_FAST_CONV3X3 / forced() takes one of {', '.join(IMPLS)}, got {impl!r}")
    return impl


@contextlib.contextmanager
def forced(impl: str | None) -> Iterator[None]:
    """Run every 3x3 convolution of the recurrent step on ``impl`` ("triton" or "aten"; None: choose)."""
    previous = _FORCED[0]
    _FORCED[0] = _validate_impl(impl)
    try:
        yield
    finally:
        _FORCED[0] = previous


def _measurable(x: torch.Tensor) -> bool:
    # nothing can be timed on fake or functional tensors (tracing) or inside a CUDA graph capture
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


def choose(kind: str, x: torch.Tensor, c_in: int, c_out: int,
           candidates: Callable[[], dict[str, Callable[[], object]]]) -> str:
    """"triton" or "aten" for a ``kind`` convolution of ``x``'s shape and dtype: forced, else the
    interpreter's kernel, else committed or measured (``candidates()``: each side as a function
    that runs it once; called only to measure)."""
    forced_impl = _validate_impl(_FORCED[0])
    if forced_impl is not None:
        return forced_impl
    if x.device.type != "cuda":
        return "triton"
    if x.dtype == torch.float64:  # fp64 tl.dot is checked in the interpreter only
        return "aten"
    n, _, h, w = x.shape
    key = (tuning.arch(x.device), kind, c_in, c_out, tuning.bucket(n * h * w), tuning.dtype_name(x.dtype))
    return pick(key, _measurable(x), candidates)


def _median_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20, return_mode="median")


def pick(key: ChoiceKey, measurable: bool, candidates: Callable[[], dict[str, Callable[[], object]]],
         time_ms: Callable[[Callable[[], object]], float] = _median_ms) -> str:
    """The committed choice for ``key``, else the one measured before, else (when ``measurable``)
    the faster candidate by ``time_ms``, remembered; else "aten"."""
    impl = CONV_CHOICES.get(key) or _MEASURED.get(key)
    if impl is not None:
        return impl
    if not measurable:
        return "aten"
    times = {name: time_ms(fn) for name, fn in candidates().items()}
    _MEASURED[key] = min(times, key=times.get)
    return _MEASURED[key]


def measured_choices() -> dict[ChoiceKey, str]:
    """What first-use measurement chose so far, in the form :data:`CONV_CHOICES` takes."""
    return dict(_MEASURED)


def _check_act(name: str, t: torch.Tensor, shape: tuple[int, ...] | None = None,
               dtype: torch.dtype | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_ndim(name, t, 4, "(N, C, H, W)")
    if shape is not None:
        check_shape(name, t, shape)
    if t.dtype not in ACTIVATION_DTYPES or (dtype is not None and t.dtype != dtype):
        raise ValueError(f"{name} must be {dtype or 'float16, bfloat16, float32 or float64'}, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} has no elements (shape {tuple(t.shape)})")
    if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"{name} must be NCHW-contiguous or channels_last, got strides {t.stride()}")


def _check_weight(w: torch.Tensor, c_out: int | None, c_in: int, dtype: torch.dtype) -> None:
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"w must be a torch.Tensor, got {type(w).__name__}")
    check_shape("w", w, (w.shape[0] if c_out is None else c_out, c_in, 3, 3))
    if w.dtype != dtype:
        raise ValueError(f"w must have the activations' dtype {dtype}, got {w.dtype}")


def _check_vectors(x: torch.Tensor, c: int, **vectors: torch.Tensor | None) -> None:
    acc = compute_dtype(x)
    for name, v in vectors.items():
        if v is None:
            continue
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor or None, got {type(v).__name__}")
        check_shape(name, v, (c,))
        want = x.dtype if name == "bias" else acc
        if v.dtype != want:
            raise ValueError(f"{name} must be {want}, got {v.dtype}")
        if not v.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got stride {v.stride()}")


def _tile(x: torch.Tensor, tiles: dict[str, tuning.Tile]) -> tuning.Tile:
    return tuning.per_arch(tiles, tuning.arch(x.device))


def _block(c: int, limit: int) -> int:
    return max(MIN_BLOCK, min(limit, triton.next_power_of_2(c)))


def _k_blocks(c_in: int, tile: tuning.Tile) -> dict[str, object]:
    """FLAT_K and BLOCK_K: below one K block of input channels the taps go into K too
    (k = tap * C_in + ci, gathered per column), so the tile is not mostly padding."""
    flat = c_in < tile["BLOCK_K"]
    return {"FLAT_K": flat, "BLOCK_K": _block(9 * c_in if flat else c_in, tile["BLOCK_K"])}


def _launch_fwd(x: torch.Tensor, wp: torch.Tensor, c_out: int, bias: torch.Tensor | None, scale: torch.Tensor | None,
                shift: torch.Tensor | None, feed: torch.Tensor | None,
                stats: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    n, c_in, h, w = x.shape
    acc = compute_dtype(x)
    tile = _tile(x, CONV_TILES)
    meta = {"BLOCK_M": tile["BLOCK_M"], "BLOCK_N": _block(c_out, tile["BLOCK_N"]), **_k_blocks(c_in, tile),
            "num_warps": tile["num_warps"], **({"num_stages": tile["num_stages"]} if "num_stages" in tile else {})}
    tiles = triton.cdiv(h * w, meta["BLOCK_M"])
    out = torch.empty((n, c_out, h, w), dtype=x.dtype, device=x.device, memory_format=dense_layout(x))
    part = torch.empty((n * tiles if stats else 1, 3, c_out), dtype=acc, device=x.device)
    none = part  # absent inputs: a stand-in pointer, never read
    feed_arg = feed if feed is not None else out
    if triton.cdiv(c_out, meta["BLOCK_N"]) > MAX_GRID_1:
        raise ValueError(f"{c_out} output channels exceed the grid's limit")
    with _device_guard(x.device):
        tuning.wrap(_conv3x3_fwd_kernel)[(n * tiles, triton.cdiv(c_out, meta["BLOCK_N"]))](
            x, wp, bias if bias is not None else none, scale if scale is not None else none,
            shift if shift is not None else none, feed_arg, out, part, h, w, c_in, c_out, tiles,
            *x.stride(), *feed_arg.stride(), *out.stride(), HAS_BIAS=bias is not None,
            PROLOGUE=scale is not None, HAS_FEED=feed is not None, STATS=stats, **_dot_flags(x), **meta)
        if not stats:
            return out, None, None
        mean = torch.empty((c_out,), dtype=acc, device=x.device)
        var = torch.empty((c_out,), dtype=acc, device=x.device)
        tuning.wrap(_stats_merge_kernel)[(triton.cdiv(c_out, MERGE_BLOCK_C),)](
            part, mean, var, h * w, c_out, meta["BLOCK_M"], tiles, n * tiles, BLOCK_C=MERGE_BLOCK_C, num_warps=4)
    return out, mean, var


def conv3x3(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
            shift: torch.Tensor | None = None, feed: torch.Tensor | None = None,
            stats: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``conv3x3(a, w) + bias + feed`` with ``a = relu(x * scale + shift)`` (or ``x``), padding 1.

    Args:
        x: (N, C_in, H, W) fp16/bf16/fp32/fp64, NCHW-contiguous or channels_last.
        w: (C_out, C_in, 3, 3) in x's dtype. bias: (C_out,) in x's dtype, or None.
        scale, shift: (C_in,) in x's compute dtype, both or neither: the prologue.
        feed: (N, C_out, H, W) like x (either layout), or None.
        stats: also return the stored output's per-channel batch mean and biased variance.
    Returns:
        (out in x's layout and dtype, mean, var): mean and var (C_out,) in the compute dtype, or None.
    """
    _check_act("x", x)
    _check_weight(w, None, x.shape[1], x.dtype)
    c_out = w.shape[0]
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift come together (the prologue) or not at all")
    _check_vectors(x, x.shape[1], scale=scale, shift=shift)
    _check_vectors(x, c_out, bias=bias)
    n, _, h, ww = x.shape
    if feed is not None:
        _check_act("feed", feed, (n, c_out, h, ww), x.dtype)
    check_same_device(x=x, w=w, **{k: v for k, v in (("bias", bias), ("scale", scale), ("shift", shift),
                                                      ("feed", feed)) if v is not None})
    wp = w.permute(2, 3, 1, 0).reshape(9 * x.shape[1], c_out).contiguous()
    return _launch_fwd(x, wp, c_out, bias, scale, shift, feed, stats)


def conv3x3_dgrad(grad: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The input gradient of a 3x3, stride-1, padding-1 convolution.

    Args:
        grad: (N, C_out, H, W) fp16/bf16/fp32/fp64, NCHW-contiguous or channels_last.
        w: (C_out, C_in, 3, 3) in grad's dtype.
    Returns:
        dx (N, C_in, H, W) in grad's layout and dtype.
    """
    _check_act("grad", grad)
    _check_weight(w, grad.shape[1], w.shape[1] if isinstance(w, torch.Tensor) else 0, grad.dtype)
    check_same_device(grad=grad, w=w)
    # the transposed convolution: tap (dy, dx) of the flipped kernel, rows co, columns ci
    wp = w.flip(2, 3).permute(2, 3, 0, 1).reshape(9 * grad.shape[1], w.shape[1]).contiguous()
    return _launch_fwd(grad, wp, w.shape[1], None, None, None, None, False)[0]


def _splits(total: int, out_tiles: int, block_p: int, device: torch.device) -> int:
    target = PROGRAMS_PER_SM * _sm_count(device) if device.type == "cuda" else INTERPRETER_SPLITS
    return max(1, min(triton.cdiv(target, out_tiles), triton.cdiv(total, block_p), MAX_GRID_1))


def conv3x3_wgrad(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None,
                  shift: torch.Tensor | None) -> torch.Tensor:
    """The weight gradient of a 3x3, stride-1, padding-1 convolution whose input is
    ``relu(x * scale + shift)`` (or ``x`` when both are None), recomputed as it is loaded.

    Args:
        grad: (N, C_out, H, W), x: (N, C_in, H, W), one dtype (fp16/bf16/fp32/fp64), either layout each.
        scale, shift: (C_in,) in the compute dtype, or both None.
    Returns:
        dw (C_out, C_in, 3, 3) contiguous, in grad's dtype; summed in the compute dtype, rounded once.
    """
    _check_act("grad", grad)
    n, _, h, w = grad.shape
    _check_act("x", x, (n, x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 4 else -1, h, w), grad.dtype)
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift come together (the prologue) or not at all")
    _check_vectors(x, x.shape[1], scale=scale, shift=shift)
    check_same_device(grad=grad, x=x, **{k: v for k, v in (("scale", scale), ("shift", shift)) if v is not None})
    c_out, c_in = grad.shape[1], x.shape[1]
    acc = compute_dtype(x)
    tile = _tile(x, WGRAD_TILES)
    meta = {"BLOCK_P": tile["BLOCK_P"], "BLOCK_N": _block(c_out, tile["BLOCK_N"]), **_k_blocks(c_in, tile),
            "num_warps": tile["num_warps"], **({"num_stages": tile["num_stages"]} if "num_stages" in tile else {})}
    total = n * h * w
    k_rows = 9 * c_in if meta["FLAT_K"] else 9 * triton.cdiv(c_in, meta["BLOCK_K"]) * meta["BLOCK_K"]
    grid01 = (triton.cdiv(k_rows, meta["BLOCK_K"]), triton.cdiv(c_out, meta["BLOCK_N"]))
    splits = _splits(total, grid01[0] * grid01[1], meta["BLOCK_P"], x.device)
    split_size = triton.cdiv(triton.cdiv(total, splits), meta["BLOCK_P"]) * meta["BLOCK_P"]
    splits = triton.cdiv(total, split_size)
    part = torch.empty((splits, 9 * c_in, c_out), dtype=acc, device=x.device)
    none = part
    with _device_guard(x.device):
        tuning.wrap(_conv3x3_wgrad_kernel)[(*grid01, splits)](
            grad, x, scale if scale is not None else none, shift if shift is not None else none, part,
            h, w, c_in, c_out, total, split_size, *grad.stride(), *x.stride(), PROLOGUE=scale is not None,
            **_dot_flags(x), **meta)
    # the splits in order (a plain reduction: the same order every run), then (C_out, C_in, 3, 3)
    dw = part.sum(0) if splits > 1 else part[0]
    return dw.view(3, 3, c_in, c_out).permute(3, 2, 0, 1).to(grad.dtype).contiguous()
