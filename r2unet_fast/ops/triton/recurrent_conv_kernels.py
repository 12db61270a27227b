"""Kernels of the recurrent conv step's fused passes (launchers: :mod:`.recurrent_conv`).

Every activation kernel takes a tile of BLOCK_M pixels x BLOCK_C channels of one image and a
batch, channel and pixel stride per tensor, so one kernel serves NCHW (pixels contiguous) and
channels_last (channels contiguous). Per-channel vectors are (C,) in the compute dtype, which
is also the accumulation dtype: float32, or float64 for float64 activations.

- ``rc_add_stats``: ``_add_stats_kernel``, grid (N, chunks, channel blocks). A program walks its
  chunk of one image tile by tile: ``out += feed`` rounded once to out's dtype and stored, and
  the statistics taken from that stored value. Each tile's mean and M2 come from two passes
  over the tile (in registers), both relative to a per-program shift K (the chunk's first
  pixel), and are merged into the program's running (count, mean, M2) by Chan's formula. It
  writes (K, mean - K, M2) per (image, chunk) and channel. ``_stats_merge_kernel``, grid
  (channel blocks,), merges those rows per channel in row order, relative to the first row's K.
  Neither level subtracts two large sums, so data of mean 1e4 and std 1 keeps fp32 accuracy.
- ``rc_bn_relu``: ``_bn_relu_kernel``, elementwise, grid (N, pixel tiles, channel blocks).
- ``rc_bn_relu_bwd``: ``_bwd_reduce_kernel`` (grid as ``_add_stats_kernel``) writes per-chunk
  sums of dy and dy*xhat; ``_sums_merge_kernel`` adds them per channel in row order;
  ``_bwd_apply_kernel`` (grid as ``_bn_relu_kernel``) writes ds and adds it to dfeed.

Determinism: no atomics. The order of every sum follows from the shape, the committed
reduction tile (``REDUCTION_TILES``, whose BLOCK_M and num_warps fix how ``tl.sum`` pairs
values), the channel block and the chunking (from the shape and SM count), never from
autotuning, which only touches num_stages there and the tiles of the elementwise kernels.

NaN and inf: results follow the oracle (``tests/recurrent_conv_oracle.py``). The relu is
``where(a < 0, 0, a)`` (NaN stays NaN); its gradient is ``dy = where(a <= 0, 0, dh)``, eager
threshold_backward's rule: a NaN pre-activation passes dh, and a NaN dh where relu is cut
gives 0. A non-finite shift K is replaced by 0: subtracting it would turn the finite values
of its channel into NaN. Padded lanes are masked out of every sum.

Assumes one image has fewer than 2**31 elements (per-image offsets are int32).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_gate_kernels import _rounded


@triton.jit
def _offsets(pix, cs, sc, sp):
    return pix[:, None] * sp + cs[None, :] * sc


@triton.jit
def _chan_merge(cnt, mean, m2, cnt_b, mean_b, m2_b):
    # Chan et al.'s parallel merge; the mean as a weighted average (not mean + delta * w),
    # so an infinite mean stays infinite instead of becoming inf - inf
    tot = cnt + cnt_b
    w_b = cnt_b / tot
    delta = mean_b - mean
    return tot, mean * (cnt / tot) + mean_b * w_b, m2 + m2_b + delta * delta * (cnt * w_b)


@triton.jit
def _sum_of(out_ptr, feed_ptr, o_off, f_off, mask, acc, HAS_FEED: tl.constexpr):
    # out (+ feed, rounded once to out's dtype) in acc: the value stored and normalized
    x = tl.load(out_ptr + o_off, mask=mask, other=0.0)
    if HAS_FEED:
        x = _rounded(x.to(acc) + tl.load(feed_ptr + f_off, mask=mask, other=0.0).to(acc),
                     out_ptr.dtype.element_ty)
    return x.to(acc)


@triton.jit
def _add_stats_kernel(out_ptr, feed_ptr, part_ptr, HW, C, chunk_size, son, soc, sop, sfn, sfc, sfp,
                      numel_bucket, HAS_FEED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # part (N * chunks, 3, C): per (image, chunk) and channel K, mean - K and M2.
    # numel_bucket is only the autotune key.
    acc = part_ptr.dtype.element_ty
    img = tl.program_id(0).to(tl.int64)
    row = img * tl.num_programs(1) + tl.program_id(1)
    start = tl.program_id(1) * chunk_size
    end = tl.minimum(start + chunk_size, HW)
    lanes = tl.arange(0, BLOCK_M)
    for c0 in range(tl.program_id(2) * BLOCK_C, C, tl.num_programs(2) * BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_mask = cs < C
        # read before this program stores there; no other program touches this chunk
        k = _sum_of(out_ptr, feed_ptr, img * son + start * sop + cs * soc, img * sfn + start * sfp + cs * sfc,
                    c_mask, acc, HAS_FEED)
        k = tl.where(k - k == 0.0, k, 0.0)
        cnt = tl.zeros([BLOCK_C], dtype=acc)
        mean = tl.zeros([BLOCK_C], dtype=acc)
        m2 = tl.zeros([BLOCK_C], dtype=acc)
        for p0 in range(start, end, BLOCK_M):
            pix = p0 + lanes
            mask = (pix < end)[:, None] & c_mask[None, :]
            o_off = img * son + _offsets(pix, cs, soc, sop)
            x = _sum_of(out_ptr, feed_ptr, o_off, img * sfn + _offsets(pix, cs, sfc, sfp), mask, acc, HAS_FEED)
            if HAS_FEED:
                tl.store(out_ptr + o_off, x.to(out_ptr.dtype.element_ty), mask=mask)  # exact: x is rounded
            cnt_t = tl.zeros([BLOCK_C], dtype=acc) + tl.minimum(end - p0, BLOCK_M).to(acc)
            y = tl.where(mask, x - k[None, :], 0.0)
            mean_t = tl.sum(y, axis=0) / cnt_t
            e = tl.where(mask, y - mean_t[None, :], 0.0)
            cnt, mean, m2 = _chan_merge(cnt, mean, m2, cnt_t, mean_t, tl.sum(e * e, axis=0))
        part = part_ptr + row * 3 * C + cs
        tl.store(part, k, mask=c_mask)
        tl.store(part + C, mean, mask=c_mask)
        tl.store(part + 2 * C, m2, mask=c_mask)


@triton.jit
def _stats_merge_kernel(part_ptr, mean_ptr, var_ptr, HW, C, chunk_size, num_chunks, num_rows,
                        BLOCK_C: tl.constexpr):
    # rows in order, relative to row 0's shift: (K_r - K_0) is exact for nearby shifts
    acc = mean_ptr.dtype.element_ty
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    k0 = tl.load(part_ptr + cs, mask=c_mask, other=0.0)
    cnt = tl.zeros([BLOCK_C], dtype=acc)
    mean = tl.zeros([BLOCK_C], dtype=acc)
    m2 = tl.zeros([BLOCK_C], dtype=acc)
    part = part_ptr + cs
    for r in range(0, num_rows):
        chunk = r % num_chunks
        cnt_b = tl.zeros([BLOCK_C], dtype=acc) + tl.minimum(chunk_size, HW - chunk * chunk_size).to(acc)
        k = tl.load(part, mask=c_mask, other=0.0)
        mean_b = (k - k0) + tl.load(part + C, mask=c_mask, other=0.0)
        cnt, mean, m2 = _chan_merge(cnt, mean, m2, cnt_b, mean_b, tl.load(part + 2 * C, mask=c_mask, other=0.0))
        part += 3 * C
    tl.store(mean_ptr + cs, k0 + mean, mask=c_mask)
    tl.store(var_ptr + cs, m2 / cnt, mask=c_mask)


@triton.jit
def _bn_relu_kernel(s_ptr, feed_ptr, res_ptr, scale_ptr, shift_ptr, h_ptr, HW, C, ssn, ssc, ssp, sfn, sfc, sfp,
                    srn, src, srp, shn, shc, shp, numel_bucket, HAS_FEED: tl.constexpr,
                    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    acc = scale_ptr.dtype.element_ty
    img = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_M)
    # grid axes 1 and 2 stop at 65535: beyond, each program takes several tiles / channel blocks
    for c0 in range(tl.program_id(2) * BLOCK_C, C, tl.num_programs(2) * BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_mask = cs < C
        scale = tl.load(scale_ptr + cs, mask=c_mask, other=0.0)
        shift = tl.load(shift_ptr + cs, mask=c_mask, other=0.0)
        for tile in range(tl.program_id(1), tl.cdiv(HW, BLOCK_M), tl.num_programs(1)):
            pix = tile * BLOCK_M + lanes
            mask = (pix < HW)[:, None] & c_mask[None, :]
            v = tl.load(s_ptr + img * ssn + _offsets(pix, cs, ssc, ssp), mask=mask, other=0.0).to(acc)
            if HAS_FEED:
                v += tl.load(feed_ptr + img * sfn + _offsets(pix, cs, sfc, sfp), mask=mask, other=0.0).to(acc)
            a = v * scale[None, :] + shift[None, :]
            h = tl.where(a < 0.0, 0.0, a)  # relu that keeps NaN
            if HAS_RESIDUAL:
                h += tl.load(res_ptr + img * srn + _offsets(pix, cs, src, srp), mask=mask, other=0.0).to(acc)
            tl.store(h_ptr + img * shn + _offsets(pix, cs, shc, shp), _rounded(h, h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dy_xhat(s, dh, scale, shift, mean, rstd):
    # cut where a <= 0, not passed where a > 0: a NaN pre-activation passes dh, as in eager relu
    dy = tl.where(s * scale[None, :] + shift[None, :] <= 0.0, 0.0, dh)
    return dy, (s - mean[None, :]) * rstd[None, :]


@triton.jit
def _bwd_reduce_kernel(s_ptr, dh_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, part_ptr, HW, C, chunk_size,
                       ssn, ssc, ssp, sdn, sdc, sdp, numel_bucket, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # part (N * chunks, 2, C): per (image, chunk) and channel, sum dy and sum dy * xhat
    acc = part_ptr.dtype.element_ty
    img = tl.program_id(0).to(tl.int64)
    row = img * tl.num_programs(1) + tl.program_id(1)
    start = tl.program_id(1) * chunk_size
    end = tl.minimum(start + chunk_size, HW)
    lanes = tl.arange(0, BLOCK_M)
    for c0 in range(tl.program_id(2) * BLOCK_C, C, tl.num_programs(2) * BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_mask = cs < C
        scale = tl.load(scale_ptr + cs, mask=c_mask, other=0.0)
        shift = tl.load(shift_ptr + cs, mask=c_mask, other=0.0)
        mean = tl.load(mean_ptr + cs, mask=c_mask, other=0.0)
        rstd = tl.load(rstd_ptr + cs, mask=c_mask, other=0.0)
        sum_dy = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc)
        sum_dy_xhat = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc)
        for p0 in range(start, end, BLOCK_M):
            pix = p0 + lanes
            mask = (pix < end)[:, None] & c_mask[None, :]
            s = tl.load(s_ptr + img * ssn + _offsets(pix, cs, ssc, ssp), mask=mask, other=0.0).to(acc)
            dh = tl.load(dh_ptr + img * sdn + _offsets(pix, cs, sdc, sdp), mask=mask, other=0.0).to(acc)
            dy, xhat = _dy_xhat(s, dh, scale, shift, mean, rstd)
            # padded lanes: 0 * xhat would be NaN for a NaN mean
            sum_dy += tl.where(mask, dy, 0.0)
            sum_dy_xhat += tl.where(mask, dy * xhat, 0.0)
        part = part_ptr + row * 2 * C + cs
        tl.store(part, tl.sum(sum_dy, axis=0), mask=c_mask)
        tl.store(part + C, tl.sum(sum_dy_xhat, axis=0), mask=c_mask)


@triton.jit
def _sums_merge_kernel(part_ptr, sum_dy_ptr, sum_dy_xhat_ptr, C, num_rows, BLOCK_C: tl.constexpr):
    acc = sum_dy_ptr.dtype.element_ty
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    sum_dy = tl.zeros([BLOCK_C], dtype=acc)
    sum_dy_xhat = tl.zeros([BLOCK_C], dtype=acc)
    part = part_ptr + cs
    for r in range(0, num_rows):
        sum_dy += tl.load(part, mask=c_mask, other=0.0)
        sum_dy_xhat += tl.load(part + C, mask=c_mask, other=0.0)
        part += 2 * C
    tl.store(sum_dy_ptr + cs, sum_dy, mask=c_mask)
    tl.store(sum_dy_xhat_ptr + cs, sum_dy_xhat, mask=c_mask)


@triton.jit
def _bwd_apply_kernel(s_ptr, dh_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, gamma_ptr, sum_dy_ptr,
                      sum_dy_xhat_ptr, ds_ptr, dfeed_ptr, HW, C, M, ssn, ssc, ssp, sdn, sdc, sdp,
                      sxn, sxc, sxp, sfn, sfc, sfp, numel_bucket, WRITE_DS: tl.constexpr,
                      HAS_DFEED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # sx*: ds's strides, sf*: dfeed's
    acc = scale_ptr.dtype.element_ty
    img = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_M)
    m = M.to(acc)
    for c0 in range(tl.program_id(2) * BLOCK_C, C, tl.num_programs(2) * BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_mask = cs < C
        scale = tl.load(scale_ptr + cs, mask=c_mask, other=0.0)
        shift = tl.load(shift_ptr + cs, mask=c_mask, other=0.0)
        mean = tl.load(mean_ptr + cs, mask=c_mask, other=0.0)
        rstd = tl.load(rstd_ptr + cs, mask=c_mask, other=0.0)
        g = tl.load(gamma_ptr + cs, mask=c_mask, other=0.0) * rstd
        mean_dy = tl.load(sum_dy_ptr + cs, mask=c_mask, other=0.0) / m
        mean_dy_xhat = tl.load(sum_dy_xhat_ptr + cs, mask=c_mask, other=0.0) / m
        for tile in range(tl.program_id(1), tl.cdiv(HW, BLOCK_M), tl.num_programs(1)):
            pix = tile * BLOCK_M + lanes
            mask = (pix < HW)[:, None] & c_mask[None, :]
            s = tl.load(s_ptr + img * ssn + _offsets(pix, cs, ssc, ssp), mask=mask, other=0.0).to(acc)
            dh = tl.load(dh_ptr + img * sdn + _offsets(pix, cs, sdc, sdp), mask=mask, other=0.0).to(acc)
            dy, xhat = _dy_xhat(s, dh, scale, shift, mean, rstd)
            ds = g[None, :] * (dy - mean_dy[None, :] - xhat * mean_dy_xhat[None, :])
            if WRITE_DS:
                tl.store(ds_ptr + img * sxn + _offsets(pix, cs, sxc, sxp), _rounded(ds, ds_ptr.dtype.element_ty),
                         mask=mask)
            if HAS_DFEED:
                f_off = img * sfn + _offsets(pix, cs, sfc, sfp)
                df = tl.load(dfeed_ptr + f_off, mask=mask, other=0.0).to(acc) + ds
                tl.store(dfeed_ptr + f_off, _rounded(df, dfeed_ptr.dtype.element_ty), mask=mask)
