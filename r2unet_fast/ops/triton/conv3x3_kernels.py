"""Implicit-GEMM 3x3 convolution kernels (stride 1, padding 1) for the recurrent conv step
(launchers: :mod:`.conv3x3`).

The convolution as a GEMM over M = the pixels of one image, N = output channels and
K = 9 taps x input channels, without an im2col buffer: the A tile of tap (dy, dx) is the input
tile shifted by one row or column, loaded with a mask that gives the zero padding.

- ``_conv3x3_fwd_kernel``, grid (N * pixel tiles, output-channel blocks). Optional prologue on
  every A tile: ``relu(x * scale + shift)`` per input channel, rounded to x's dtype (the stored
  ``h`` the unfused path would convolve), with the padding applied to that activation, not to
  x. Epilogue: ``+ bias``, ``+ feed``, rounded once to out's dtype and stored; with ``STATS``,
  each program also writes its tile's per-channel (K, mean - K, M2) of the stored values (K: the
  tile's first pixel), the rows ``_stats_merge_kernel`` of :mod:`.recurrent_conv_kernels` merges
  in order. The data gradient is this kernel on the gradient with the flipped, transposed
  weights.
- ``_conv3x3_wgrad_kernel``, grid (9 taps x input-channel blocks, output-channel blocks,
  S splits of the N*H*W pixels): per-split partials of ``dW[tap] = x_shift^T dy`` (with the same
  optional prologue recomputed on load); the launcher adds the S partials in order.

Precision: fp32 accumulation (fp64 for fp64). bf16/fp16 operands go to ``tl.dot`` in their
dtype; fp32 uses IEEE products, not TF32 (as the attention gate: fp32 training asks for fp32
results; cuDNN may use TF32 there, and the per-shape choice weighs that speed); fp64 runs in the
interpreter. The interpreter multiplies
bf16 bit patterns in tl.dot, so there bf16 operands are widened to fp32 first (exact).

Determinism: no atomics; every sum's order follows from the committed tile (``CONV_TILES``) and
the shape. NaN: the prologue's relu keeps NaN, masked lanes never enter a sum.

Assumes one image has fewer than 2**31 elements (per-image offsets are int32).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_gate_kernels import _operand, _rounded


@triton.jit
def _prologue(a, mask, scale_ptr, shift_ptr, ks, k_mask, acc_dtype: tl.constexpr, DTYPE: tl.constexpr):
    # relu(a * scale + shift) in DTYPE (a's), 0 where masked: the padding belongs to h, not to s
    scale = tl.load(scale_ptr + ks, mask=k_mask, other=0.0)
    shift = tl.load(shift_ptr + ks, mask=k_mask, other=0.0)
    v = a.to(acc_dtype) * scale[None, :] + shift[None, :]
    v = tl.where(v < 0.0, 0.0, v)
    return _rounded(tl.where(mask, v, 0.0), DTYPE)


@triton.jit
def _flat_tile(x_ptr, scale_ptr, shift_ptr, base, py, px, p_mask, ks, H, W, Cin, sxc, sxh, sxw,
               PROLOGUE: tl.constexpr, acc_dtype: tl.constexpr, DTYPE: tl.constexpr):
    # the A tile [pixels, ks] with the taps in K (k = tap * Cin + ci), and its column mask;
    # base: the image offset, a scalar or a [pixels, 1] column
    k_mask = ks < 9 * Cin
    tap = ks // Cin
    ci = ks % Cin
    iy = py[:, None] + (tap // 3 - 1)[None, :]
    ix = px[:, None] + (tap % 3 - 1)[None, :]
    mask = p_mask[:, None] & k_mask[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    a = tl.load(x_ptr + base + iy * sxh + ix * sxw + ci[None, :] * sxc, mask=mask, other=0.0)
    if PROLOGUE:
        a = _prologue(a, mask, scale_ptr, shift_ptr, ci, k_mask, acc_dtype, DTYPE)
    return a, k_mask


@triton.jit
def _conv3x3_fwd_kernel(x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, feed_ptr, out_ptr, part_ptr,
                        H, W, Cin, Cout, tiles, sxn, sxc, sxh, sxw, sfn, sfc, sfh, sfw, son, soc, soh, sow,
                        HAS_BIAS: tl.constexpr, PROLOGUE: tl.constexpr, HAS_FEED: tl.constexpr,
                        STATS: tl.constexpr, FLAT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    # w: (9 * Cin, Cout) contiguous, row tap * Cin + ci; part: (N * tiles, 3, Cout)
    acc_dtype = part_ptr.dtype.element_ty
    dot_dtype = x_ptr.dtype.element_ty
    row = tl.program_id(0)
    img = (row // tiles).to(tl.int64)
    tile = row % tiles
    hw = H * W
    pix = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = pix < hw
    py = pix // W
    px = pix % W
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = ns < Cout
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    if FLAT_K:
        for k0 in range(0, 9 * Cin, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a, k_mask = _flat_tile(x_ptr, scale_ptr, shift_ptr, img * sxn, py, px, m_mask, ks, H, W, Cin,
                                   sxc, sxh, sxw, PROLOGUE, acc_dtype, dot_dtype)
            b = tl.load(w_ptr + ks[:, None] * Cout + ns[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(_operand(a, dot_dtype, WIDEN), _operand(b, dot_dtype, WIDEN), acc,
                         input_precision=PRECISION, out_dtype=acc_dtype)
    else:
        for tap in tl.static_range(9):
            iy = py + (tap // 3 - 1)
            ix = px + (tap % 3 - 1)
            inside = m_mask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            base = img * sxn + iy * sxh + ix * sxw
            for k0 in range(0, Cin, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = ks < Cin
                a_mask = inside[:, None] & k_mask[None, :]
                a = tl.load(x_ptr + base[:, None] + ks[None, :] * sxc, mask=a_mask, other=0.0)
                if PROLOGUE:
                    a = _prologue(a, a_mask, scale_ptr, shift_ptr, ks, k_mask, acc_dtype, dot_dtype)
                b = tl.load(w_ptr + (tap * Cin + ks)[:, None] * Cout + ns[None, :],
                            mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc = tl.dot(_operand(a, dot_dtype, WIDEN), _operand(b, dot_dtype, WIDEN), acc,
                             input_precision=PRECISION, out_dtype=acc_dtype)
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ns, mask=n_mask, other=0.0).to(acc_dtype)[None, :]
    if HAS_FEED:
        acc += tl.load(feed_ptr + img * sfn + py[:, None] * sfh + px[:, None] * sfw + ns[None, :] * sfc,
                       mask=mask, other=0.0).to(acc_dtype)
    stored = _rounded(acc, out_ptr.dtype.element_ty)
    tl.store(out_ptr + img * son + py[:, None] * soh + px[:, None] * sow + ns[None, :] * soc, stored, mask=mask)
    if STATS:
        v = stored.to(acc_dtype)
        k = tl.sum(tl.where((tl.arange(0, BLOCK_M) == 0)[:, None], v, 0.0), axis=0)  # the tile's first pixel
        k = tl.where(k - k == 0.0, k, 0.0)  # a non-finite shift would turn the finite values into NaN
        cnt = tl.minimum(hw - tile * BLOCK_M, BLOCK_M).to(acc_dtype)
        y = tl.where(mask, v - k[None, :], 0.0)
        mean = tl.sum(y, axis=0) / cnt
        e = tl.where(mask, y - mean[None, :], 0.0)
        part = part_ptr + row.to(tl.int64) * 3 * Cout + ns
        tl.store(part, k, mask=n_mask)
        tl.store(part + Cout, mean, mask=n_mask)
        tl.store(part + 2 * Cout, tl.sum(e * e, axis=0), mask=n_mask)


@triton.jit
def _conv3x3_wgrad_kernel(dy_ptr, x_ptr, scale_ptr, shift_ptr, part_ptr, H, W, Cin, Cout, total, split_size,
                          sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw, PROLOGUE: tl.constexpr, FLAT_K: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    # part: (S, 9 * Cin, Cout), row tap * Cin + ci; split s covers pixels [s * split_size, ...) of N*H*W
    acc_dtype = part_ptr.dtype.element_ty
    dot_dtype = x_ptr.dtype.element_ty
    if FLAT_K:  # rows k = tap * Cin + ci of the packed gradient
        ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = ks < 9 * Cin
        rows = ks
        tap = 0
    else:
        k_blocks = tl.cdiv(Cin, BLOCK_K)
        tap = tl.program_id(0) // k_blocks
        ks = (tl.program_id(0) % k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = ks < Cin
        rows = tap * Cin + ks
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = ns < Cout
    oy = tap // 3 - 1
    ox = tap % 3 - 1
    hw = H * W
    start = tl.program_id(2) * split_size
    end = tl.minimum(start + split_size, total)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=acc_dtype)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < end
        img = (p // hw).to(tl.int64)
        q = p % hw
        py = q // W
        px = q % W
        g = tl.load(dy_ptr + (img * sdn + py * sdh + px * sdw)[:, None] + ns[None, :] * sdc,
                    mask=p_mask[:, None] & n_mask[None, :], other=0.0)
        if FLAT_K:
            a, _ = _flat_tile(x_ptr, scale_ptr, shift_ptr, (img * sxn)[:, None], py, px, p_mask, ks, H, W, Cin, sxc, sxh, sxw,
                              PROLOGUE, acc_dtype, dot_dtype)
        else:
            iy = py + oy
            ix = px + ox
            inside = p_mask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            a_mask = inside[:, None] & k_mask[None, :]
            a = tl.load(x_ptr + (img * sxn + iy * sxh + ix * sxw)[:, None] + ks[None, :] * sxc, mask=a_mask,
                        other=0.0)
            if PROLOGUE:
                a = _prologue(a, a_mask, scale_ptr, shift_ptr, ks, k_mask, acc_dtype, dot_dtype)
        acc = tl.dot(tl.trans(_operand(a, dot_dtype, WIDEN)), _operand(g, dot_dtype, WIDEN), acc,
                     input_precision=PRECISION, out_dtype=acc_dtype)
    out = part_ptr + tl.program_id(2).to(tl.int64) * 9 * Cin * Cout + rows[:, None] * Cout + ns[None, :]
    tl.store(out, acc, mask=k_mask[:, None] & n_mask[None, :])
