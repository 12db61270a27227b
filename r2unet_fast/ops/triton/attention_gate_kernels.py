"""Fused attention-gate kernels: ``out = x * sigmoid(w_psi . relu(W_x x + W_g g + b) + b_psi)``.

Forward, one launch, ``_fwd_kernel`` grid (N, pixel tiles): a program takes BLOCK_M pixels of
one image, computes ``a = x W_x^T + g W_g^T + bias`` one F block at a time (both 1x1 GEMMs with
``tl.dot`` into one accumulator, looping over K blocks of Cx and of Cg), ``q += relu(a) . w_psi``,
then ``psi = sigmoid(q + b_psi)`` and writes psi and ``out = x * psi`` (x re-read per channel
block; it is in L2). Nothing F-sized leaves the program.

Backward, four launches and three deterministic sums, nothing saved by the forward but its inputs:

1. ``_bwd_da_kernel``, grid (N, pixel tiles), a fixed tile: recomputes q and psi (first pass over
   the F blocks), ``dpsi = sum_c grad_out_c x_c + grad_psi``, ``dq = dpsi psi (1 - psi)``, then
   recomputes a (second pass) and writes the transient ``da = dq w_psi [a > 0]`` (M, F) and psi
   (M,) in fp32, plus per-tile partials (tiles, 2F + 1) of dbias, dw_psi and db_psi.
2. ``_bwd_dx_kernel``, grid (N, pixel tiles): ``dx = grad_out psi + da W_x``, ``dg = da W_g``
   (``tl.dot`` over F blocks).
3. ``_bwd_dw_kernel``, twice (x, g), grid (F blocks, C blocks, S splits of the N*H*W pixels):
   per-split partials (S, F, C) of ``da^T x`` / ``da^T g``.
4. ``torch.sum`` over the partial axis of the three partial buffers (a plain reduction, the
   same order every run): dW_x, dW_g, and dbias/dw_psi/db_psi.

da is the transient the brief allows: F*(Cx+Cg) partials per pixel tile would be too large at
deep levels (Cx=512, F=256), while the (M, F) da lets the weight gradients be GEMMs.

Memory formats: x, g (and out, grad_out, dx, dg) are NCHW or channels_last; the kernels take a
batch, channel and pixel stride per tensor (pixel p of an image is at ``p * pixel_stride``:
stride 1 for NCHW, C for channels_last), so one kernel serves both.

Precision: the GEMMs accumulate in fp32 (fp64 for fp64 inputs). bf16/fp16 inputs go to
``tl.dot`` in their dtype with the weights rounded to it, as autocast's conv does; fp32 uses
``input_precision="ieee"`` (no TF32). The interpreter multiplies bf16 bit patterns in tl.dot,
so there bf16 operands are widened to fp32 first (exact: same products, fp32 sums). da is
stored in x's dtype for bf16/fp16 (autocast's backward is in that dtype too) and in the
compute dtype otherwise; every output is computed in fp32 and rounded once, to nearest even.

NaN: relu is ``where(a < 0, 0, a)`` (NaN stays NaN) and its gradient ``where(a <= 0, 0, .)``
(NaN passes, as torch's threshold_backward on the result); padded channel and pixel lanes are
masked out of every sum, so an inf in a weight cannot put ``0 * inf`` into a real result.

Determinism: the backward's per-tile partials and its (F, C) GEMM order depend on its tiles,
so those are committed per architecture (``REDUCTION_TILES``, ``CHANNEL_TILES``) and only
num_stages is autotuned there; the split count S comes from the shape and the SM count. The
forward and the dx/dg kernel autotune BLOCK_M and num_warps (their channel blocks, which set
the order of each pixel's sums, stay fixed).

Assumes one image of x or g has fewer than 2**31 elements (per-image offsets are int32).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .hybrid_loss import _sigmoid_parts


@triton.jit
def _rounded(value, DTYPE: tl.constexpr):
    # value in DTYPE, rounded to nearest even (by hand for bfloat16: the interpreter truncates)
    if DTYPE == tl.bfloat16:
        bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(value == value, rounded, value.to(tl.bfloat16))  # NaN stays NaN
    else:
        return value.to(DTYPE)


@triton.jit
def _operand(v, DOT_DTYPE: tl.constexpr, WIDEN: tl.constexpr):
    # a tl.dot operand: in DOT_DTYPE, widened to fp32 where the interpreter cannot multiply bf16
    if v.dtype != DOT_DTYPE:  # the weights, for half-precision x
        v = _rounded(v, DOT_DTYPE)
    if WIDEN:
        v = v.to(tl.float32)
    return v


@triton.jit
def _project(acc, v_ptr, w_ptr, v_base, pix, m_mask, fs, f_mask, C, svc, svp, BLOCK_K: tl.constexpr,
             PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    # acc[BLOCK_M, BLOCK_F] += v[pix, :C] W[fs, :C]^T, K blocks of BLOCK_K channels in order
    dot_dtype = v_ptr.dtype.element_ty
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < C
        vt = tl.load(v_ptr + v_base + pix[:, None] * svp + ks[None, :] * svc,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptr + fs[None, :] * C + ks[:, None], mask=k_mask[:, None] & f_mask[None, :], other=0.0)
        acc = tl.dot(_operand(vt, dot_dtype, WIDEN), _operand(wt, dot_dtype, WIDEN), acc,
                     input_precision=PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit
def _gate_preact(x_ptr, g_ptr, wx_ptr, wg_ptr, b_ptr, x_base, g_base, pix, m_mask, f0, Cx, Cg, F,
                 sxc, sxp, sgc, sgp, BLOCK_M: tl.constexpr, BLOCK_KX: tl.constexpr,
                 BLOCK_KG: tl.constexpr, BLOCK_F: tl.constexpr, PRECISION: tl.constexpr,
                 WIDEN: tl.constexpr):
    # a[BLOCK_M, BLOCK_F] = x W_x^T + g W_g^T + bias for the F columns f0 ... f0 + BLOCK_F
    acc_dtype = wx_ptr.dtype.element_ty
    fs = f0 + tl.arange(0, BLOCK_F)
    f_mask = fs < F
    acc = tl.zeros([BLOCK_M, BLOCK_F], dtype=acc_dtype)
    acc = _project(acc, x_ptr, wx_ptr, x_base, pix, m_mask, fs, f_mask, Cx, sxc, sxp, BLOCK_KX, PRECISION, WIDEN)
    acc = _project(acc, g_ptr, wg_ptr, g_base, pix, m_mask, fs, f_mask, Cg, sgc, sgp, BLOCK_KG, PRECISION, WIDEN)
    bias = tl.load(b_ptr + fs, mask=f_mask, other=0.0)
    return acc + bias[None, :], fs, f_mask


@triton.jit
def _gate_logit(x_ptr, g_ptr, wx_ptr, wg_ptr, b_ptr, wpsi_ptr, x_base, g_base, pix, m_mask, Cx, Cg, F,
                sxc, sxp, sgc, sgp, BLOCK_M: tl.constexpr, BLOCK_KX: tl.constexpr, BLOCK_KG: tl.constexpr,
                BLOCK_F: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    # q - b_psi = relu(a) . w_psi per pixel, F blocks in order
    q = tl.zeros([BLOCK_M], dtype=wx_ptr.dtype.element_ty)
    for f0 in range(0, F, BLOCK_F):
        a, fs, f_mask = _gate_preact(x_ptr, g_ptr, wx_ptr, wg_ptr, b_ptr, x_base, g_base, pix, m_mask, f0,
                                     Cx, Cg, F, sxc, sxp, sgc, sgp, BLOCK_M, BLOCK_KX, BLOCK_KG, BLOCK_F,
                                     PRECISION, WIDEN)
        r = tl.where(a < 0.0, 0.0, a)  # relu that keeps NaN
        w_psi = tl.load(wpsi_ptr + fs, mask=f_mask, other=0.0)
        # padded F lanes masked: there a = 0 * (inf weight) could be NaN
        q += tl.sum(tl.where(f_mask[None, :], r * w_psi[None, :], 0.0), axis=1)
    return q


@triton.jit
def _fwd_kernel(x_ptr, g_ptr, wx_ptr, wg_ptr, b_ptr, wpsi_ptr, bpsi_ptr, out_ptr, psi_ptr,
                HW, Cx, Cg, F, sxn, sxc, sxp, sgn, sgc, sgp, son, soc, sop, numel_bucket,
                BLOCK_M: tl.constexpr, BLOCK_KX: tl.constexpr, BLOCK_KG: tl.constexpr, BLOCK_F: tl.constexpr,
                PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    # numel_bucket is only the autotune key
    img = tl.program_id(0).to(tl.int64)
    x_base = img * sxn
    g_base = img * sgn
    o_base = img * son
    b_psi = tl.load(bpsi_ptr)
    lanes = tl.arange(0, BLOCK_M)
    # grid axis 1 is capped at 65535 tiles: beyond that, each program takes several
    for tile in range(tl.program_id(1), tl.cdiv(HW, BLOCK_M), tl.num_programs(1)):
        pix = tile * BLOCK_M + lanes
        m_mask = pix < HW
        q = _gate_logit(x_ptr, g_ptr, wx_ptr, wg_ptr, b_ptr, wpsi_ptr, x_base, g_base, pix, m_mask, Cx, Cg, F,
                        sxc, sxp, sgc, sgp, BLOCK_M, BLOCK_KX, BLOCK_KG, BLOCK_F, PRECISION, WIDEN)
        _, psi, _ = _sigmoid_parts(q + b_psi)
        tl.store(psi_ptr + img * HW + pix, _rounded(psi, psi_ptr.dtype.element_ty), mask=m_mask)
        for c0 in range(0, Cx, BLOCK_KX):
            cs = c0 + tl.arange(0, BLOCK_KX)
            mask = m_mask[:, None] & (cs < Cx)[None, :]
            xt = tl.load(x_ptr + x_base + pix[:, None] * sxp + cs[None, :] * sxc, mask=mask, other=0.0)
            out = xt.to(psi.dtype) * psi[:, None]
            tl.store(out_ptr + o_base + pix[:, None] * sop + cs[None, :] * soc,
                     _rounded(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_da_kernel(x_ptr, g_ptr, wx_ptr, wg_ptr, b_ptr, wpsi_ptr, bpsi_ptr, go_ptr, gpsi_ptr,
                   da_ptr, psi_ptr, part_ptr, HW, Cx, Cg, F, sxn, sxc, sxp, sgn, sgc, sgp, son, soc, sop,
                   numel_bucket, HAS_GRAD_PSI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KX: tl.constexpr,
                   BLOCK_KG: tl.constexpr, BLOCK_F: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    # so*: grad_out's strides. Writes da (M, F), psi (M,) and partials (N * tiles, 2F + 1):
    # [sum da (F), sum dq r (F), sum dq] per pixel tile.
    img = tl.program_id(0).to(tl.int64)
    x_base = img * sxn
    g_base = img * sgn
    o_base = img * son
    b_psi = tl.load(bpsi_ptr)
    lanes = tl.arange(0, BLOCK_M)
    num_tiles = tl.cdiv(HW, BLOCK_M)
    for tile in range(tl.program_id(1), num_tiles, tl.num_programs(1)):
        pix = tile * BLOCK_M + lanes
        m_mask = pix < HW
        row = img * HW + pix
        q = _gate_logit(x_ptr, g_ptr, wx_ptr, wg_ptr, b_ptr, wpsi_ptr, x_base, g_base, pix, m_mask, Cx, Cg, F,
                        sxc, sxp, sgc, sgp, BLOCK_M, BLOCK_KX, BLOCK_KG, BLOCK_F, PRECISION, WIDEN)
        _, psi, one_minus_psi = _sigmoid_parts(q + b_psi)
        dpsi = tl.zeros([BLOCK_M], dtype=q.dtype)
        for c0 in range(0, Cx, BLOCK_KX):
            cs = c0 + tl.arange(0, BLOCK_KX)
            mask = m_mask[:, None] & (cs < Cx)[None, :]
            xt = tl.load(x_ptr + x_base + pix[:, None] * sxp + cs[None, :] * sxc, mask=mask, other=0.0)
            go = tl.load(go_ptr + o_base + pix[:, None] * sop + cs[None, :] * soc, mask=mask, other=0.0)
            dpsi += tl.sum(go.to(q.dtype) * xt.to(q.dtype), axis=1)
        if HAS_GRAD_PSI:
            dpsi += tl.load(gpsi_ptr + row, mask=m_mask, other=0.0).to(q.dtype)
        dq = tl.where(m_mask, dpsi * psi * one_minus_psi, 0.0)
        tl.store(psi_ptr + row, psi, mask=m_mask)
        part = part_ptr + (img * num_tiles + tile) * (2 * F + 1)
        tl.store(part + 2 * F, tl.sum(dq, axis=0))
        for f0 in range(0, F, BLOCK_F):
            a, fs, f_mask = _gate_preact(x_ptr, g_ptr, wx_ptr, wg_ptr, b_ptr, x_base, g_base, pix, m_mask, f0,
                                         Cx, Cg, F, sxc, sxp, sgc, sgp, BLOCK_M, BLOCK_KX, BLOCK_KG, BLOCK_F,
                                         PRECISION, WIDEN)
            r = tl.where(a < 0.0, 0.0, a)
            w_psi = tl.load(wpsi_ptr + fs, mask=f_mask, other=0.0)
            lanes_mask = m_mask[:, None] & f_mask[None, :]
            # relu's gradient is cut where a <= 0 (a NaN passes, as in torch's threshold_backward)
            da = tl.where(a <= 0.0, 0.0, dq[:, None] * w_psi[None, :])
            da = tl.where(lanes_mask, da, 0.0)
            tl.store(da_ptr + row[:, None] * F + fs[None, :], _rounded(da, da_ptr.dtype.element_ty), mask=lanes_mask)
            tl.store(part + fs, tl.sum(da, axis=0), mask=f_mask)
            tl.store(part + F + fs, tl.sum(tl.where(lanes_mask, dq[:, None] * r, 0.0), axis=0), mask=f_mask)


@triton.jit
def _da_times_w(da_ptr, w_ptr, row, m_mask, c0, C, F, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_F: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    # (da W)[BLOCK_M, BLOCK_C] for the channels c0 ... c0 + BLOCK_C of W (F, C)
    acc_dtype = w_ptr.dtype.element_ty
    dot_dtype = da_ptr.dtype.element_ty
    cs = c0 + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_dtype)
    for f0 in range(0, F, BLOCK_F):
        fs = f0 + tl.arange(0, BLOCK_F)
        f_mask = fs < F
        da = tl.load(da_ptr + row[:, None] * F + fs[None, :], mask=m_mask[:, None] & f_mask[None, :], other=0.0)
        w = tl.load(w_ptr + fs[:, None] * C + cs[None, :], mask=f_mask[:, None] & c_mask[None, :], other=0.0)
        acc = tl.dot(_operand(da, dot_dtype, WIDEN), _operand(w, dot_dtype, WIDEN), acc,
                     input_precision=PRECISION, out_dtype=acc_dtype)
    return acc, cs, c_mask


@triton.jit
def _bwd_dx_kernel(go_ptr, wx_ptr, wg_ptr, da_ptr, psi_ptr, dx_ptr, dg_ptr, HW, Cx, Cg, F,
                   son, soc, sop, sdxn, sdxc, sdxp, sdgn, sdgc, sdgp, numel_bucket,
                   BLOCK_M: tl.constexpr, BLOCK_KX: tl.constexpr, BLOCK_KG: tl.constexpr, BLOCK_F: tl.constexpr,
                   PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    img = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_M)
    for tile in range(tl.program_id(1), tl.cdiv(HW, BLOCK_M), tl.num_programs(1)):
        pix = tile * BLOCK_M + lanes
        m_mask = pix < HW
        row = img * HW + pix
        psi = tl.load(psi_ptr + row, mask=m_mask, other=0.0)
        for c0 in range(0, Cx, BLOCK_KX):
            acc, cs, c_mask = _da_times_w(da_ptr, wx_ptr, row, m_mask, c0, Cx, F, BLOCK_M, BLOCK_KX, BLOCK_F,
                                          PRECISION, WIDEN)
            mask = m_mask[:, None] & c_mask[None, :]
            go = tl.load(go_ptr + img * son + pix[:, None] * sop + cs[None, :] * soc, mask=mask, other=0.0)
            dx = go.to(psi.dtype) * psi[:, None] + acc
            tl.store(dx_ptr + img * sdxn + pix[:, None] * sdxp + cs[None, :] * sdxc,
                     _rounded(dx, dx_ptr.dtype.element_ty), mask=mask)
        for c0 in range(0, Cg, BLOCK_KG):
            acc, cs, c_mask = _da_times_w(da_ptr, wg_ptr, row, m_mask, c0, Cg, F, BLOCK_M, BLOCK_KG, BLOCK_F,
                                          PRECISION, WIDEN)
            mask = m_mask[:, None] & c_mask[None, :]
            tl.store(dg_ptr + img * sdgn + pix[:, None] * sdgp + cs[None, :] * sdgc,
                     _rounded(acc, dg_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dw_kernel(da_ptr, v_ptr, part_ptr, HW, M, C, F, svn, svc, svp, chunk, numel_bucket,
                   BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                   PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    # partial[s] (F, C) = sum over pixels m of split s of da[m, :]^T v[m, :], m = n * HW + p
    acc_dtype = part_ptr.dtype.element_ty
    dot_dtype = da_ptr.dtype.element_ty
    fs = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    f_mask = fs < F
    c_mask = cs < C
    start = split.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, M)
    acc = tl.zeros([BLOCK_F, BLOCK_C], dtype=acc_dtype)
    for m0 in range(start, end, BLOCK_P):
        ms = m0 + tl.arange(0, BLOCK_P)
        p_mask = ms < end
        da_t = tl.load(da_ptr + ms[None, :] * F + fs[:, None], mask=f_mask[:, None] & p_mask[None, :], other=0.0)
        n = ms // HW
        p = (ms - n * HW).to(tl.int32)
        v = tl.load(v_ptr + n[:, None] * svn + p[:, None] * svp + cs[None, :] * svc,
                    mask=p_mask[:, None] & c_mask[None, :], other=0.0)
        acc = tl.dot(_operand(da_t, dot_dtype, WIDEN), _operand(v, dot_dtype, WIDEN), acc,
                     input_precision=PRECISION, out_dtype=acc_dtype)
    tl.store(part_ptr + (split.to(tl.int64) * F + fs[:, None]) * C + cs[None, :], acc,
             mask=f_mask[:, None] & c_mask[None, :])
