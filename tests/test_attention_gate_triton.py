"""Launcher-level tests of the Triton attention gate (``ops/triton/attention_gate.py``).

Run through the interpreter on CPU tensors here (conftest sets TRITON_INTERPRET), on CUDA
tensors where a GPU exists. The ground truth is torch autograd through
``reference.attention_gate``; the library op and the C++ twin have their own tests.
"""
from __future__ import annotations


import pytest
import torch
from poison import poisoned_allocations

from r2unet_fast.ops import reference
from r2unet_fast.ops.dispatch import available_backends

from backend_cases import TRITON_DEVICE

_reason = available_backends(None, torch.device(TRITON_DEVICE))["triton"]
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"triton: {_reason}")
DEVICE = torch.device(TRITON_DEVICE)
GRAD_NAMES = ("dx", "dg", "dw_x", "dw_g", "dbias", "dw_psi", "db_psi")
# the launchers take float64 only in the interpreter; on CUDA the precise cases run in float32
PRECISE = torch.float64 if DEVICE.type == "cpu" else torch.float32
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 1e-5)}  # (rtol, atol per unit of scale)


def _ag():
    from r2unet_fast.ops.triton import attention_gate
    return attention_gate


def _inputs(n=2, cx=5, cg=7, f=3, h=13, w=9, dtype=PRECISE, channels_last=False):
    """x, g and the five weights (float64 weights for float64 x, else float32), on DEVICE."""
    wdtype = reference.compute_dtype(torch.empty(0, dtype=dtype))
    x = torch.randn(n, cx, h, w, dtype=wdtype)
    g = torch.randn(n, cg, h, w, dtype=wdtype)
    if channels_last:
        x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    weights = [torch.randn(f, cx, dtype=wdtype) / cx ** 0.5, torch.randn(f, cg, dtype=wdtype) / cg ** 0.5,
               0.5 * torch.randn(f, dtype=wdtype), torch.randn(f, dtype=wdtype), 0.5 * torch.randn(1, dtype=wdtype)]
    return x.to(DEVICE, dtype), g.to(DEVICE, dtype), [t.to(DEVICE) for t in weights]


def _cotangents(x, seed=1):
    gen = torch.Generator().manual_seed(seed)
    n, _, h, w = x.shape
    go = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(DEVICE, x.dtype)
    go = go.contiguous(memory_format=torch.channels_last if _is_channels_last(x) else torch.contiguous_format)
    gp = torch.randn((n, 1, h, w), generator=gen, dtype=torch.float64).to(DEVICE, x.dtype)
    return go, gp


def _is_channels_last(t):
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _reference(x, g, weights, go, gp, exact=True):
    """out, psi and the seven gradients of (out*go).sum() + (psi*gp).sum() (gp None: no psi term).

    ``exact``: computed in float64 (a CUDA conv in float32 would use TF32) and returned in the
    dtypes the launchers return; else in the inputs' own dtypes."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, g, *weights)]
    if exact:
        leaves = [t.detach().double().requires_grad_() for t in leaves]
        go, gp = go.double(), (gp.double() if gp is not None else None)
    out, psi = reference.attention_gate(*leaves, return_psi=True)
    loss = (out * go).sum() + ((psi * gp).sum() if gp is not None else 0)
    got = (out.detach(), psi.detach(), *torch.autograd.grad(loss, leaves))
    if not exact:
        return got
    dtypes = [x.dtype, x.dtype, x.dtype, g.dtype] + [w.dtype for w in weights]
    return tuple(t.to(d) for t, d in zip(got, dtypes))


def _fast(x, g, weights, go, gp):
    ag = _ag()
    out, psi = ag.attention_gate_fwd(x, g, *weights)
    grads = ag.attention_gate_bwd(x, g, *weights, go, gp if gp is not None else go.new_empty(0))
    return (out, psi, *grads)


def _assert_all_close(got, want, rtol, atol_scale, names=("out", "psi") + GRAD_NAMES):
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        finite = b[torch.isfinite(b)]
        scale = max(finite.abs().max().item() if finite.numel() else 0.0, 1.0)
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol_scale * scale,
                                   equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("grad_psi", [True, False], ids=["grad_psi", "no_grad_psi"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", sorted({PRECISE, torch.float32}, key=str))
def test_matches_reference_autograd(dtype, channels_last, grad_psi):
    x, g, weights = _inputs(dtype=dtype, channels_last=channels_last)
    go, gp = _cotangents(x)
    gp = gp if grad_psi else None
    _assert_all_close(_fast(x, g, weights, go, gp), _reference(x, g, weights, go, gp), *TOL[dtype])


@pytest.mark.parametrize("cx,cg,f", [(40, 20, 24), (20, 40, 70)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_channels_beyond_one_block(cx, cg, f, channels_last):
    # K blocks of 32: Cx or Cg = 40 takes two; F blocks of 64: F = 70 takes two
    x, g, weights = _inputs(cx=cx, cg=cg, f=f, channels_last=channels_last)
    go, gp = _cotangents(x)
    _assert_all_close(_fast(x, g, weights, go, gp), _reference(x, g, weights, go, gp), *TOL[PRECISE])


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 1, 7, 1), (2, 4, 1, 6)], ids=["1x1", "Wx1", "1xW"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_degenerate_shapes(shape, channels_last):
    # size-1 dims have free strides in torch: the launchers must not read them
    n, c, h, w = shape
    x, g, weights = _inputs(n=n, cx=c, cg=2, f=1, h=h, w=w, channels_last=channels_last)
    go, gp = _cotangents(x)
    _assert_all_close(_fast(x, g, weights, go, gp), _reference(x, g, weights, go, gp), *TOL[PRECISE])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_outputs_keep_dtype_and_layout(channels_last):
    x, g, weights = _inputs(dtype=torch.float32, cx=4, cg=6, channels_last=channels_last)
    g = g[:, :5]  # g may have its own channel count; stays in x's format
    g = g.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    weights[1] = weights[1][:, :5].contiguous()
    go, gp = _cotangents(x)
    out, psi, dx, dg, *wgrads = _fast(x, g, weights, go, gp)
    assert out.stride() == x.stride() and dx.stride() == x.stride() and dg.stride() == g.stride()
    assert psi.shape == (2, 1, 13, 9) and psi.is_contiguous() and psi.dtype == x.dtype
    for got, w in zip(wgrads, weights):
        assert got.shape == w.shape and got.dtype == w.dtype


def test_the_per_pixel_formulas():
    # the backward written out per pixel (no conv, no autograd), in float64 from the inputs
    x, g, weights = _inputs(n=1, cx=3, cg=4, f=5, h=3, w=4)
    go, gp = _cotangents(x)
    got = _fast(x, g, weights, go, gp)
    x, g, go, gp = x.double(), g.double(), go.double(), gp.double()
    w_x, w_g, bias, w_psi, b_psi = [w.double() for w in weights]
    xm, gm = x[0].flatten(1).T, g[0].flatten(1).T  # (pixels, C)
    a = xm @ w_x.T + gm @ w_g.T + bias
    r = a.clamp_min(0)
    psi = torch.sigmoid(r @ w_psi + b_psi)
    dpsi = (go[0].flatten(1).T * xm).sum(1) + gp.flatten()
    dq = dpsi * psi * (1 - psi)
    da = dq[:, None] * w_psi * (a > 0)
    want = (xm * psi[:, None], psi, go[0].flatten(1).T * psi[:, None] + da @ w_x, da @ w_g,
            da.T @ xm, da.T @ gm, da.sum(0), r.T @ dq, dq.sum()[None])
    out, psi_got, dx, dg, *wgrads = got
    got = (out[0].flatten(1).T, psi_got.flatten(), dx[0].flatten(1).T, dg[0].flatten(1).T, *wgrads)
    rtol, atol = TOL[PRECISE]
    for name, a_, b_ in zip(("out", "psi") + GRAD_NAMES, got, want):
        torch.testing.assert_close(a_.double(), b_, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def test_tile_loop_beyond_the_grid_cap(monkeypatch):
    # grid axis 1 stops at MAX_GRID_1 tiles; beyond, each program loops over several
    ag = _ag()
    monkeypatch.setattr(ag, "MAX_GRID_1", 1)
    x, g, weights = _inputs(h=17, w=9)  # 153 pixels: 3 tiles of 64 in one program
    go, gp = _cotangents(x)
    _assert_all_close(_fast(x, g, weights, go, gp), _reference(x, g, weights, go, gp), *TOL[PRECISE])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_output_buffers_are_fully_written(channels_last, monkeypatch):
    x, g, weights = _inputs(dtype=torch.float32, cx=40, cg=7, f=70, channels_last=channels_last)
    go, gp = _cotangents(x)
    with poisoned_allocations(monkeypatch):
        assert torch.isnan(torch.empty(2, device=DEVICE)).all()
        got = _fast(x, g, weights, go, gp)
    _assert_all_close(got, _reference(x, g, weights, go, gp), 1e-4, 1e-5)
    assert all(torch.isfinite(t).all() for t in got)


def _with_nonfinite(case, x, g, weights):
    x, g, weights = x.clone(), g.clone(), [w.clone() for w in weights]
    if case == "nan_x":
        x[1, 2, 4, 3] = float("nan")
    elif case == "nan_g":
        g[0, 6, 0, 8] = float("nan")
    elif case == "nan_w_x":
        weights[0][1, 4] = float("nan")
    elif case == "nan_w_psi":
        weights[3][2] = float("nan")
    elif case == "nan_b_psi":
        weights[4][0] = float("nan")
    elif case == "inf_w_x":
        weights[0][0, 0] = float("inf")
    elif case == "inf_x_open_gate":
        # W_x, w_psi > 0: a = +inf at that pixel, psi = 1 and out = inf there, not NaN
        # (padded F lanes must stay out of q, where 0 * inf would be NaN)
        weights[0].abs_()
        weights[3].abs_()
        x[0, 0, 5, 5] = float("inf")
    return x, g, weights


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("case", ["nan_x", "nan_g", "nan_w_x", "nan_w_psi", "nan_b_psi", "inf_w_x",
                                  "inf_x_open_gate"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_nonfinite_inputs_match_the_reference(case, channels_last):
    x, g, weights = _with_nonfinite(case, *_inputs(channels_last=channels_last))
    go, gp = _cotangents(x)
    want = _reference(x, g, weights, go, gp)
    got = _fast(x, g, weights, go, gp)
    for name, a, b in zip(("out", "psi") + GRAD_NAMES, got, want):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaN pattern differs"
        assert torch.equal(torch.isinf(a), torch.isinf(b)), f"{name}: inf pattern differs"
    if case == "inf_x_open_gate":
        assert got[0][0, 0, 5, 5].item() == float("inf") and got[1][0, 0, 5, 5].item() == 1.0
    _assert_all_close(got, want, *TOL[PRECISE])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_half_precision_error_within_twice_the_references(dtype, channels_last):
    # error against the float64 reference on the same (rounded) inputs, at most twice the
    # reference's own error when it runs in the half dtype. The GEMM weights are rounded to the
    # half dtype in both (as autocast's conv does), so the exact values are those of the rounded
    # weights: else a relu kink within a weight rounding of some a would decide the max error.
    x, g, weights = _inputs(dtype=dtype, cx=40, cg=20, f=24, channels_last=channels_last)
    go, gp = _cotangents(x)
    rounded = [w.to(dtype).double() for w in weights[:2]] + [w.double() for w in weights[2:]]
    exact = _reference(x.double(), g.double(), rounded, go.double(), gp.double())
    ref_half = _reference(x, g, [w.to(dtype) for w in weights], go, gp, exact=False)
    got = _fast(x, g, weights, go, gp)
    for name, a, r, e in zip(("out", "psi") + GRAD_NAMES, got, ref_half, exact):
        assert a.dtype == (dtype if name in ("out", "psi", "dx", "dg") else torch.float32), name
        ours = (a.double() - e).abs().max().item()
        theirs = (r.double() - e).abs().max().item()
        scale = e.abs().max().item()
        assert ours <= 2 * theirs + 1e-6 * scale, f"{name}: {ours:.3g} vs reference {theirs:.3g}"
        # the reference's half-precision backward sums in half precision and is far off: bound
        # ours by the dtype's own resolution too
        assert ours <= 2 * torch.finfo(dtype).eps * scale, f"{name}: {ours:.3g} at scale {scale:.3g}"


def test_bf16_outputs_are_rounded_once_to_nearest_even():
    # out and psi are computed in fp32 and rounded once: against the float64 value rounded by
    # torch (nearest even), an element may differ by one unit only where fp32 sat at a tie
    x, g, weights = _inputs(dtype=torch.bfloat16, cx=40, cg=20, f=24)
    wb = [w.to(torch.bfloat16).double() for w in weights[:2]] + [w.double() for w in weights[2:]]
    out64, psi64 = reference.attention_gate(x.double(), g.double(), *wb, return_psi=True)
    out, psi = _ag().attention_gate_fwd(x, g, *weights)
    for got, want in ((out, out64.to(torch.bfloat16)), (psi, psi64.to(torch.bfloat16))):
        assert (got != want).double().mean().item() < 0.01


def test_weight_gradients_are_deterministic():
    x, g, weights = _inputs(dtype=torch.float32, cx=40, cg=20, f=70)
    go, gp = _cotangents(x)
    first = _fast(x, g, weights, go, gp)
    second = _fast(x, g, weights, go, gp)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


class _Gate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, w_x, w_g, bias, w_psi, b_psi):
        ctx.save_for_backward(x, g, w_x, w_g, bias, w_psi, b_psi)
        return _ag().attention_gate_fwd(x, g, w_x, w_g, bias, w_psi, b_psi)

    @staticmethod
    def backward(ctx, grad_out, grad_psi):
        return _ag().attention_gate_bwd(*ctx.saved_tensors, grad_out.contiguous(), grad_psi.contiguous())


@pytest.mark.skipif(PRECISE != torch.float64,
                    reason="gradcheck needs float64: the launchers take it only in the interpreter")
def test_gradcheck():
    x, g, weights = _inputs(n=2, cx=3, cg=2, f=2, h=2, w=3)
    leaves = [t.detach().clone().requires_grad_() for t in (x, g, *weights)]
    assert torch.autograd.gradcheck(_Gate.apply, leaves, eps=1e-6, atol=1e-7, fast_mode=True)


def test_tuned_configs_report_what_ran():
    x, g, weights = _inputs(dtype=torch.float32)
    go, gp = _cotangents(x)
    _fast(x, g, weights, go, gp)
    report = _ag().tuned_configs()  # empty lists in the interpreter: one config each, nothing tuned
    assert set(report) == {"fwd", "bwd_da", "bwd_dx", "bwd_dw"}
    ag = _ag()
    for name, tiles in report.items():
        for entry in tiles:
            assert entry["key"][1] == name and entry["dtype"] == "float32"
            if name == "bwd_da":  # a reduction kernel: its tile is the committed one
                fixed = ag.tuning.per_arch(ag.REDUCTION_TILES, entry["arch"])
                assert all(entry["tile"][k] == v for k, v in fixed.items())
