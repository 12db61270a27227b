"""Fused hybrid-loss kernels: per-image sums in one read, gradient in one read + one write.

The forward produces five per-image sums (N, 5) from which
:func:`r2unet_fast.ops.autograd.combine_sums` builds the reference's (N, 4)
sums, so ``pos_weight`` never enters a kernel (and keeps float64 precision):

    I  = sum p*t           P  = sum p            T = sum t
    B0 = sum (1-t)*softplus(x)  (= -(1-t) log(1-p))
    B1 = sum t*softplus(-x)     (= -t log p)

The backward takes the gradient of the loss with respect to those sums
(``g``, (N, 5), autograd's job) and applies, per pixel, with q = 1 - p:

    dL/dx = p*q*(gI*t + gP) + gB0*(1-t)*p - gB1*t*q
    dL/dt = gI*p + gT + (gB1 - gB0)*softplus(-x) - gB0*x
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from ..reference import compute_dtype

# Tile used under the interpreter and as the first autotune candidate. A GPU
# sweep (benchmarks/gpu_report.py prints the winners) commits them into
# TUNED_TILES, keyed (kernel "fwd"/"bwd", pixels per image, logits dtype
# name), e.g. {("fwd", 65536, "bfloat16"): {"BLOCK_SIZE": 2048, "num_warps": 8}};
# a committed tile bypasses autotuning for its shape.
DEFAULT_TILE: dict[str, int] = {"BLOCK_SIZE": 1024, "num_warps": 4}
TUNED_TILES: dict[tuple[str, int, str], dict[str, int]] = {}
# Forward chunks are multiples of this (>= every candidate BLOCK_SIZE) so
# that the tiles of a chunk are full except in the image's last chunk.
CHUNK_ALIGN: int = 2048
# Forward programs to aim for per SM: enough loads in flight to cover HBM latency.
PROGRAMS_PER_SM: int = 4
NUM_SUMS: int = 5


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _candidate_configs() -> list[triton.Config]:
    default = triton.Config({"BLOCK_SIZE": DEFAULT_TILE["BLOCK_SIZE"]}, num_warps=DEFAULT_TILE["num_warps"])
    if _interpreting():
        return [default]  # every extra config is one more slow interpreted run
    others = [triton.Config({"BLOCK_SIZE": b}, num_warps=w)
              for b in (512, 1024, 2048) for w in (4, 8)
              if (b, w) != (DEFAULT_TILE["BLOCK_SIZE"], DEFAULT_TILE["num_warps"])]
    return [default] + others


@triton.jit
def _log1p_small(e):
    # log1p for e in [0, 1] from log alone (no libdevice, which the
    # interpreter lacks): log(u) * e / (u - 1) cancels the rounding of u = 1 + e.
    u = 1.0 + e
    d = u - 1.0
    return tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _sigmoid_parts(x):
    # e = exp(-|x|), p = sigmoid(x) and q = 1 - p, each without cancellation
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return e, tl.where(x >= 0.0, r, e * r), tl.where(x >= 0.0, e * r, r)


@triton.jit
def _as_element_of(value, ptr):
    # value in ptr's element type, rounded to nearest even. By hand for
    # bfloat16: the compiled cast rounds so too, the interpreter's truncates.
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(value == value, rounded, value.to(tl.bfloat16))  # NaN stays NaN
    else:
        return value.to(ptr.dtype.element_ty)


@triton.jit
def _hybrid_loss_fwd_kernel(x_ptr, t_ptr, part_ptr, numel_per_image, chunk_size, num_chunks,
                            BLOCK_SIZE: tl.constexpr):
    # images on grid axis 1 (up to 65535), chunks / tiles on axis 0 (no practical limit)
    chunk = tl.program_id(0)
    img = tl.program_id(1)
    acc_dtype = part_ptr.dtype.element_ty
    base = img.to(tl.int64) * numel_per_image
    start = chunk * chunk_size
    end = tl.minimum(start + chunk_size, numel_per_image)
    lanes = tl.arange(0, BLOCK_SIZE)
    s_pt = tl.zeros([BLOCK_SIZE], dtype=acc_dtype)
    s_p = tl.zeros([BLOCK_SIZE], dtype=acc_dtype)
    s_t = tl.zeros([BLOCK_SIZE], dtype=acc_dtype)
    s_b0 = tl.zeros([BLOCK_SIZE], dtype=acc_dtype)
    s_b1 = tl.zeros([BLOCK_SIZE], dtype=acc_dtype)
    for off in range(start, end, BLOCK_SIZE):
        idx = off + lanes
        mask = idx < end
        x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(acc_dtype)
        t = tl.load(t_ptr + base + idx, mask=mask, other=0.0).to(acc_dtype)
        e, p, _ = _sigmoid_parts(x)
        log1p_e = _log1p_small(e)
        softplus_pos = tl.maximum(x, 0.0) + log1p_e
        softplus_neg = tl.maximum(-x, 0.0) + log1p_e
        # masked lanes load x = t = 0, which still has p = 1/2 and softplus = log 2
        s_pt += p * t
        s_p += tl.where(mask, p, 0.0)
        s_t += t
        s_b0 += tl.where(mask, (1.0 - t) * softplus_pos, 0.0)
        s_b1 += t * softplus_neg
    out = part_ptr + (img.to(tl.int64) * num_chunks + chunk) * 5
    tl.store(out + 0, tl.sum(s_pt, axis=0))
    tl.store(out + 1, tl.sum(s_p, axis=0))
    tl.store(out + 2, tl.sum(s_t, axis=0))
    tl.store(out + 3, tl.sum(s_b0, axis=0))
    tl.store(out + 4, tl.sum(s_b1, axis=0))


@triton.jit
def _hybrid_loss_bwd_kernel(x_ptr, t_ptr, g_ptr, gx_ptr, gt_ptr, numel_per_image,
                            GRAD_TARGET: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    img = tl.program_id(1)
    acc_dtype = g_ptr.dtype.element_ty
    idx = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = idx < numel_per_image
    base = img.to(tl.int64) * numel_per_image
    g = g_ptr + img.to(tl.int64) * 5
    g_i = tl.load(g + 0)
    g_p = tl.load(g + 1)
    g_t = tl.load(g + 2)
    g_b0 = tl.load(g + 3)
    g_b1 = tl.load(g + 4)
    x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(acc_dtype)
    t = tl.load(t_ptr + base + idx, mask=mask, other=0.0).to(acc_dtype)
    e, p, q = _sigmoid_parts(x)
    gx = p * q * (g_i * t + g_p) + g_b0 * (1.0 - t) * p - g_b1 * t * q
    tl.store(gx_ptr + base + idx, _as_element_of(gx, gx_ptr), mask=mask)
    if GRAD_TARGET:
        softplus_neg = tl.maximum(-x, 0.0) + _log1p_small(e)
        gt = g_i * p + g_t + (g_b1 - g_b0) * softplus_neg - g_b0 * x
        tl.store(gt_ptr + base + idx, _as_element_of(gt, gt_ptr), mask=mask)


_fwd_autotuned = triton.autotune(configs=_candidate_configs(), key=["numel_per_image"])(_hybrid_loss_fwd_kernel)
_bwd_autotuned = triton.autotune(configs=_candidate_configs(), key=["numel_per_image"])(_hybrid_loss_bwd_kernel)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * _sm_count(device)
    return 4  # interpreter: few programs, but still several chunks per image


def _chunking(num_images: int, numel_per_image: int, device: torch.device) -> tuple[int, int]:
    """(chunk_size, num_chunks) per image so the grid fills the device."""
    wanted = max(1, triton.cdiv(_target_programs(device), num_images))
    chunks = min(triton.cdiv(numel_per_image, CHUNK_ALIGN), wanted)
    chunk_size = triton.cdiv(triton.cdiv(numel_per_image, chunks), CHUNK_ALIGN) * CHUNK_ALIGN
    return chunk_size, triton.cdiv(numel_per_image, chunk_size)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _launch(kernel: str, autotuned, grid, numel_per_image: int, dtype: torch.dtype, *args, **constexprs) -> None:
    tile = TUNED_TILES.get((kernel, numel_per_image, _dtype_name(dtype)))
    device = args[0].device
    # Triton launches on the current CUDA device, which need not be the tensors' one
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if tile is None:
            autotuned[grid](*args, **constexprs)
        else:
            meta = dict(tile)
            autotuned.fn[grid](*args, **constexprs, BLOCK_SIZE=meta.pop("BLOCK_SIZE"), **meta)


def hybrid_loss_fwd(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image sums (I, P, T, B0, B1) of the hybrid loss.

    Args:
        logits: (N, ...) fp32/bf16/fp16/fp64 on CUDA (or CPU under the interpreter);
            each image's elements dense and contiguous in memory.
        target: same shape and memory layout as ``logits``, any float dtype.
    Returns:
        (N, 5) float32 (float64 for float64 logits).
    """
    n = logits.shape[0]
    numel = logits.numel() // n
    chunk_size, num_chunks = _chunking(n, numel, logits.device)
    partials = torch.empty((n, num_chunks, NUM_SUMS), dtype=compute_dtype(logits), device=logits.device)
    _launch("fwd", _fwd_autotuned, (num_chunks, n), numel, logits.dtype,
            logits, target, partials, numel, chunk_size, num_chunks)
    # second stage in a fixed order: deterministic, unlike atomics
    return partials.sum(dim=1)


def hybrid_loss_bwd(logits: torch.Tensor, target: torch.Tensor, grad_sums: torch.Tensor,
                    grad_target: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of the loss from the gradient with respect to the five sums.

    Args:
        logits, target: as for :func:`hybrid_loss_fwd`.
        grad_sums: (N, 5) contiguous, float32 (float64 for float64 logits).
        grad_target: also return the target's gradient.
    Returns:
        grad_logits like ``logits`` (dtype and strides), and grad_target like
        ``target`` or None.
    """
    n = logits.shape[0]
    numel = logits.numel() // n
    grad_logits = torch.empty_like(logits)
    grad_tgt = torch.empty_like(target) if grad_target else None

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(numel, meta["BLOCK_SIZE"]), n)

    # without a target gradient the pointer is never read: pass grad_logits as a stand-in
    _launch("bwd", _bwd_autotuned, grid, numel, logits.dtype, logits, target, grad_sums, grad_logits,
            grad_tgt if grad_tgt is not None else grad_logits, numel, GRAD_TARGET=grad_target)
    return grad_logits, grad_tgt


def tuned_configs() -> dict[str, list[dict[str, object]]]:
    """What autotuning chose so far, per kernel: pixels per image, logits dtype and the winning config,
    in the form TUNED_TILES takes (the GPU report prints these)."""
    out: dict[str, list[dict[str, object]]] = {}
    for name, tuner in (("fwd", _fwd_autotuned), ("bwd", _bwd_autotuned)):
        # autotune keys are (numel_per_image, dtype of each tensor argument...), logits first
        out[name] = [{"numel_per_image": key[0], "dtype": str(key[1]).replace("torch.", ""),
                      "tile": {**cfg.kwargs, "num_warps": cfg.num_warps}}
                     for key, cfg in tuner.cache.items()]
    return out
