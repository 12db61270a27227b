"""Fused hybrid-loss kernels: forward and backward in three launches, no host sync.

1. ``_fwd_kernel``, grid (N, chunks): each program sums one chunk of one image into five
   partial sums, (N, chunks, 5):

       I  = sum p*t           P  = sum p            T = sum t
       B0 = sum (1-t)*softplus(x)  (= -(1-t) log(1-p))
       B1 = sum t*softplus(-x)     (= -t log p)

2. ``_epilogue_kernel``, one program: reduces the partials per image in chunk order, combines
   B = B0 + pos_weight*B1, computes per-image or pooled Dice and the scalar loss, and writes
   ``coef`` (N, 5), the loss's gradient with respect to each image's sums at grad_output 1.
   It is the reference's ``loss_from_sums`` written out with its autograd gradient
   (``csrc/hybrid_loss_epilogue.cpp`` is its C++ twin).
3. ``_bwd_kernel``, grid (N, tiles): reads grad_output from its pointer, g = grad_output*coef,
   and applies per pixel, with q = 1 - p:

       dL/dx = p*q*(gI*t + gP) + gB0*(1-t)*p - gB1*t*q
       dL/dt = gI*p + gT + gB1*softplus(-x) - gB0*softplus(x)

The batch is on grid axis 0 (no limit on N); axis 1 (chunks, tiles) stays below 65535.
softplus(x) is computed as x + softplus(-x), NaN at x = -inf like the reference's
(1-t)*x + (...)*softplus(-x), so non-finite logits give the reference's NaNs and infinities.
The launchers are the bodies of the ``r2unet_fast::hybrid_loss_triton`` ops
(:mod:`r2unet_fast.ops.library.hybrid_loss`); tiles come from :mod:`.tuning`.
"""
from __future__ import annotations

import contextlib
import functools
import struct

import torch
import triton
import triton.language as tl

from ..reference import compute_dtype
from . import tuning

NUM_SUMS: int = 5
# The forward's tile fixes its summation order, so it is committed per architecture and
# never autotuned (only num_stages is): the per-image sums are the same bits for a given
# input shape and device, whatever autotuning picks.
REDUCTION_TILES: dict[str, tuning.Tile] = {"default": {"BLOCK_SIZE": 1024, "num_warps": 4}}
# The backward is elementwise (no order to keep): its tile is free. First entry: the default.
BWD_TILES: list[tuning.Tile] = [{"BLOCK_SIZE": b, "num_warps": w} for b, w in
                                ((1024, 4), (512, 4), (512, 8), (1024, 8), (2048, 4), (2048, 8))]
# Committed winners, {(arch, "fwd"/"bwd", numel_bucket, dtype): tile}, skip autotuning for their
# key; benchmarks/gpu_report.py prints them ready to paste.
TUNED_TILES: dict[tuning.CommittedKey, tuning.Tile] = {
    # one autotune run on an H200 (torch 2.11, triton 3.6), batch 16 of 256x256
    ("sm_90", "fwd", 65536, "float32"): {"num_stages": 1},
    ("sm_90", "fwd", 65536, "bfloat16"): {"num_stages": 1},
    ("sm_90", "bwd", 65536, "float32"): {"BLOCK_SIZE": 512, "num_warps": 4, "num_stages": 3},
    ("sm_90", "bwd", 65536, "bfloat16"): {"BLOCK_SIZE": 1024, "num_warps": 4, "num_stages": 3},
}
# Forward programs to aim for per SM: enough loads in flight to cover HBM latency.
PROGRAMS_PER_SM: int = 4
MAX_GRID_1: int = 65535


@triton.jit
def _log1p_small(e):
    # log1p for e in [0, 1] from log alone (no libdevice, which the
    # interpreter lacks): log(u) * e / (u - 1) cancels the rounding of u = 1 + e.
    u = 1.0 + e
    d = u - 1.0
    return tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _sigmoid_parts(x):
    # e = exp(-|x|), p = sigmoid(x) and q = 1 - p, each without cancellation; NaN stays NaN
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return e, tl.where(x >= 0.0, r, e * r), tl.where(x >= 0.0, e * r, r)


@triton.jit
def _softplus_pair(x, e):
    # softplus(-x) and softplus(x) = x + softplus(-x). For finite x, x + max(-x, 0) is exactly
    # max(x, 0); at x = -inf it is NaN, as in the reference. tl.maximum may drop a NaN x
    # (fmaxf), but log1p(e) is NaN then.
    l = _log1p_small(e)
    relu_neg = tl.maximum(-x, 0.0)
    return relu_neg + l, (x + relu_neg) + l


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
def _fwd_kernel(x_ptr, t_ptr, part_ptr, numel_per_image, chunk_size, num_chunks, numel_bucket,
                BLOCK_SIZE: tl.constexpr):
    # numel_bucket is only the autotune key
    img = tl.program_id(0)
    chunk = tl.program_id(1)
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
        sp_neg, sp_pos = _softplus_pair(x, e)
        # masked lanes load x = t = 0, which still has p = 1/2 and softplus = log 2
        s_pt += p * t
        s_p += tl.where(mask, p, 0.0)
        s_t += t
        s_b0 += tl.where(mask, (1.0 - t) * sp_pos, 0.0)
        s_b1 += t * sp_neg
    out = part_ptr + (img.to(tl.int64) * num_chunks + chunk) * 5
    tl.store(out + 0, tl.sum(s_pt, axis=0))
    tl.store(out + 1, tl.sum(s_p, axis=0))
    tl.store(out + 2, tl.sum(s_t, axis=0))
    tl.store(out + 3, tl.sum(s_b0, axis=0))
    tl.store(out + 4, tl.sum(s_b1, axis=0))


@triton.jit
def _epilogue_kernel(part_ptr, loss_ptr, coef_ptr, num_images, num_chunks, numel,
                     pw_hi, pw_lo, dw_hi, dw_lo, bw_hi, bw_lo, sm_hi, sm_lo,
                     PER_IMAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program, so every sum runs in one fixed order. Scalars arrive as pairs hi + lo:
    # eager Triton passes Python floats as float32 (float64 needs the low part), inductor as
    # float64, the interpreter as Python floats; summed from a zero of the accumulation dtype
    # and cast to it, each becomes one scalar of that dtype in all three.
    acc = coef_ptr.dtype.element_ty
    zero = tl.sum(tl.zeros([BLOCK_N], dtype=acc), axis=0)
    pos_weight = ((zero + pw_hi) + pw_lo).to(acc)
    dice_weight = ((zero + dw_hi) + dw_lo).to(acc)
    bce_weight = ((zero + bw_hi) + bw_lo).to(acc)
    smooth = ((zero + sm_hi) + sm_lo).to(acc)
    g_b0 = bce_weight / numel  # loss = bce_weight * (sum B / numel) + dice_weight * (1 - Dice)
    g_b1 = g_b0 * pos_weight
    g_dice = -dice_weight / num_images  # d loss / d dice_i (per image: through the mean)
    lanes = tl.arange(0, BLOCK_N)
    bce_acc = tl.zeros([BLOCK_N], dtype=acc)
    dice_acc = tl.zeros([BLOCK_N], dtype=acc)
    tot_i = tl.zeros([BLOCK_N], dtype=acc)
    tot_p = tl.zeros([BLOCK_N], dtype=acc)
    tot_t = tl.zeros([BLOCK_N], dtype=acc)
    for first in range(0, num_images, BLOCK_N):
        img = first + lanes
        m = img < num_images
        row = part_ptr + img.to(tl.int64) * num_chunks * 5
        s_i = tl.zeros([BLOCK_N], dtype=acc)
        s_p = tl.zeros([BLOCK_N], dtype=acc)
        s_t = tl.zeros([BLOCK_N], dtype=acc)
        s_b0 = tl.zeros([BLOCK_N], dtype=acc)
        s_b1 = tl.zeros([BLOCK_N], dtype=acc)
        for c in range(0, num_chunks):
            s_i += tl.load(row + c * 5 + 0, mask=m, other=0.0)
            s_p += tl.load(row + c * 5 + 1, mask=m, other=0.0)
            s_t += tl.load(row + c * 5 + 2, mask=m, other=0.0)
            s_b0 += tl.load(row + c * 5 + 3, mask=m, other=0.0)
            s_b1 += tl.load(row + c * 5 + 4, mask=m, other=0.0)
        bce_acc += tl.where(m, s_b0 + pos_weight * s_b1, 0.0)
        out = coef_ptr + img.to(tl.int64) * 5
        tl.store(out + 3, g_b0 + tl.zeros([BLOCK_N], dtype=acc), mask=m)
        tl.store(out + 4, g_b1 + tl.zeros([BLOCK_N], dtype=acc), mask=m)
        if PER_IMAGE:
            # d(num/den): g/den and -g*num/den^2, the reference's own operations (same NaNs)
            num = 2.0 * s_i + smooth
            den = tl.where(m, s_p + s_t + smooth, 1.0)  # masked lanes: no 0/0 (it warns in the interpreter)
            dice_acc += tl.where(m, num / den, 0.0)
            g_den = -g_dice * num / (den * den)
            tl.store(out + 0, 2.0 * (g_dice / den), mask=m)
            tl.store(out + 1, g_den, mask=m)
            tl.store(out + 2, g_den, mask=m)
        else:
            tot_i += s_i  # masked lanes loaded zeros
            tot_p += s_p
            tot_t += s_t
    if PER_IMAGE:
        dice = tl.sum(dice_acc, axis=0) / num_images
    else:
        num = 2.0 * tl.sum(tot_i, axis=0) + smooth
        den = tl.sum(tot_p, axis=0) + tl.sum(tot_t, axis=0) + smooth
        dice = num / den
        g_pool = g_dice * num_images  # pooled: one Dice, no mean over images
        g_i = 2.0 * (g_pool / den) + tl.zeros([BLOCK_N], dtype=acc)
        g_den = -g_pool * num / (den * den) + tl.zeros([BLOCK_N], dtype=acc)
        for first in range(0, num_images, BLOCK_N):
            img = first + lanes
            m = img < num_images
            out = coef_ptr + img.to(tl.int64) * 5
            tl.store(out + 0, g_i, mask=m)
            tl.store(out + 1, g_den, mask=m)
            tl.store(out + 2, g_den, mask=m)
    tl.store(loss_ptr, bce_weight * (tl.sum(bce_acc, axis=0) / numel) + dice_weight * (1.0 - dice))


@triton.jit
def _bwd_kernel(x_ptr, t_ptr, coef_ptr, go_ptr, gx_ptr, gt_ptr, numel_per_image, numel_bucket,
                GRAD_TARGET: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    img = tl.program_id(0)
    acc_dtype = coef_ptr.dtype.element_ty
    # the loss is linear in grad_output: scale the grad_output-1 coefficients by it here
    go = tl.load(go_ptr).to(acc_dtype)
    c = coef_ptr + img.to(tl.int64) * 5
    g_i = go * tl.load(c + 0)
    g_p = go * tl.load(c + 1)
    g_t = go * tl.load(c + 2)
    g_b0 = go * tl.load(c + 3)
    g_b1 = go * tl.load(c + 4)
    base = img.to(tl.int64) * numel_per_image
    lanes = tl.arange(0, BLOCK_SIZE)
    # grid axis 1 is capped at 65535 tiles: beyond that, each program takes several
    for tile in range(tl.program_id(1), tl.cdiv(numel_per_image, BLOCK_SIZE), tl.num_programs(1)):
        idx = tile * BLOCK_SIZE + lanes
        mask = idx < numel_per_image
        x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(acc_dtype)
        t = tl.load(t_ptr + base + idx, mask=mask, other=0.0).to(acc_dtype)
        e, p, q = _sigmoid_parts(x)
        gx = p * q * (g_i * t + g_p) + g_b0 * (1.0 - t) * p - g_b1 * t * q
        tl.store(gx_ptr + base + idx, _as_element_of(gx, gx_ptr), mask=mask)
        if GRAD_TARGET:
            sp_neg, sp_pos = _softplus_pair(x, e)
            gt = g_i * p + g_t + g_b1 * sp_neg - g_b0 * sp_pos
            tl.store(gt_ptr + base + idx, _as_element_of(gt, gt_ptr), mask=mask)


def _configs(tiles: list[tuning.Tile], num_stages: tuple[int | None, ...] = (None,)) -> list[triton.Config]:
    tiles = tiles[:1] if tuning.interpreting() else tiles  # each config is one more slow interpreted run
    out = []
    for tile in tiles:
        meta = dict(tile)
        warps = meta.pop("num_warps")
        out += [triton.Config(meta, num_warps=warps, **({} if s is None else {"num_stages": s})) for s in num_stages]
    return out


# only num_stages is tuned in the forward: its reduction tile is fixed per architecture
_fwd_tuners = tuning.PerArch("fwd", lambda arch: triton.autotune(
    configs=_configs([tuning.per_arch(REDUCTION_TILES, arch)], (2,) if tuning.interpreting() else (1, 2, 3)),
    key=["numel_bucket"])(_fwd_kernel))
_bwd_tuners = tuning.PerArch("bwd", lambda arch: triton.autotune(
    configs=_configs(BWD_TILES), key=["numel_bucket"])(_bwd_kernel))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _chunking(num_images: int, numel_per_image: int, device: torch.device, block: int) -> tuple[int, int]:
    """(chunk_size, num_chunks) per image so the grid fills the device; from the shape and device only."""
    target = PROGRAMS_PER_SM * _sm_count(device) if device.type == "cuda" else 4
    wanted = max(1, triton.cdiv(target, num_images))
    align = 2 * block  # chunks are whole tiles, so only an image's last tile is partial
    chunks = min(triton.cdiv(numel_per_image, align), wanted)
    chunk_size = triton.cdiv(triton.cdiv(numel_per_image, chunks), align) * align
    return chunk_size, triton.cdiv(numel_per_image, chunk_size)


def _split(value: float) -> tuple[float, float]:
    """``value`` as float32 hi + lo (about 48 significant bits) for a kernel's float32 scalar arguments."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, value - hi


def _device_guard(device: torch.device):
    # Triton launches on the current CUDA device, which need not be the tensors' one
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def hybrid_loss_epilogue(partials: torch.Tensor, numel: int, pos_weight: float, dice_weight: float,
                         bce_weight: float, smooth: float, per_image: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and coefficients from partial sums (the forward's second launch; tested alone).

    Args:
        partials: (N, chunks, 5) contiguous, float32 or float64.
        numel: pixels in the whole batch.
    Returns:
        loss 0-d and coef (N, 5), both of ``partials``' dtype.
    """
    n = partials.shape[0]
    loss = torch.empty((), dtype=partials.dtype, device=partials.device)
    coef = torch.empty((n, NUM_SUMS), dtype=partials.dtype, device=partials.device)
    block_n = min(max(triton.next_power_of_2(int(n)), 16), 1024)  # from N alone: a fixed order per shape
    with _device_guard(partials.device):
        tuning.wrap(_epilogue_kernel)[(1,)](
            partials, loss, coef, n, partials.shape[1], numel, *_split(pos_weight), *_split(dice_weight),
            *_split(bce_weight), *_split(smooth), PER_IMAGE=per_image, BLOCK_N=block_n, num_warps=4)
    return loss, coef


def hybrid_loss_fwd(logits: torch.Tensor, target: torch.Tensor, pos_weight: float, dice_weight: float,
                    bce_weight: float, smooth: float, per_image: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The hybrid loss and its gradient coefficients, in two launches.

    Args:
        logits: (N, ...) fp32/bf16/fp16/fp64 on CUDA (or CPU under the interpreter);
            each image's elements dense and contiguous in memory.
        target: same shape and memory layout as ``logits``, any float dtype.
    Returns:
        loss 0-d and coef (N, 5) (dLoss/dsums at grad_output 1), float32 (float64 for float64 logits).
    """
    n = logits.shape[0]
    numel = logits.numel() // n
    arch = tuning.arch(logits.device)
    reduction = tuning.per_arch(REDUCTION_TILES, arch)
    chunk_size, num_chunks = _chunking(n, numel, logits.device, reduction["BLOCK_SIZE"])
    partials = torch.empty((n, num_chunks, NUM_SUMS), dtype=compute_dtype(logits), device=logits.device)
    key = (arch, "fwd", tuning.bucket(numel), tuning.dtype_name(logits.dtype))
    tile = tuning.launch_config(TUNED_TILES, key, {}, fixed=reduction)
    kernel = _fwd_tuners(arch) if tile is None else _fwd_kernel
    with _device_guard(logits.device):
        tuning.wrap(kernel)[(n, num_chunks)](logits, target, partials, numel, chunk_size, num_chunks, key[2],
                                             **(tile or {}))
    return hybrid_loss_epilogue(partials, n * numel, pos_weight, dice_weight, bce_weight, smooth, per_image)


def hybrid_loss_bwd(logits: torch.Tensor, target: torch.Tensor, coef: torch.Tensor, grad_loss: torch.Tensor,
                    grad_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the loss, in one launch.

    Args:
        logits, target: as for :func:`hybrid_loss_fwd`.
        coef: (N, 5) from :func:`hybrid_loss_fwd`; grad_loss: 0-d, its dtype (read on the device).
        grad_target: also compute the target's gradient.
    Returns:
        grad_logits like ``logits`` (dtype and strides) and grad_target like ``target``
        (an empty tensor when not asked for).
    """
    n = logits.shape[0]
    numel = logits.numel() // n
    grad_logits = torch.empty_like(logits)
    grad_tgt = torch.empty_like(target) if grad_target else target.new_empty(0)
    key = (tuning.arch(logits.device), "bwd", tuning.bucket(numel), tuning.dtype_name(logits.dtype))
    tile = tuning.launch_config(TUNED_TILES, key, BWD_TILES[0])
    kernel = _bwd_tuners(key[0]) if tile is None else _bwd_kernel

    def grid(meta: dict) -> tuple[int, int]:
        return (n, min(triton.cdiv(numel, meta["BLOCK_SIZE"]), MAX_GRID_1))

    # without a target gradient the pointer is never read: pass grad_logits as a stand-in
    with _device_guard(logits.device):
        tuning.wrap(kernel)[grid](logits, target, coef, grad_loss, grad_logits,
                                  grad_tgt if grad_target else grad_logits, numel, key[2],
                                  GRAD_TARGET=grad_target, **(tile or {}))
    return grad_logits, grad_tgt


def tuned_configs() -> dict[str, list[dict[str, object]]]:
    """What autotuning chose so far per kernel: entries with ``arch``, ``numel_per_image`` (the
    power-of-two bucket), ``dtype``, ``tile`` and ``key``, so that ``TUNED_TILES[key] = tile``
    commits it (benchmarks/gpu_report.py prints these)."""
    return {tuners.name: tuners.winners() for tuners in (_fwd_tuners, _bwd_tuners)}
