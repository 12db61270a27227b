"""The attention gate's C++ launchers (``ops.cpu.attention_gate_fwd/_bwd``) against the reference.

Launcher level: the reference's autograd gives every gradient of
``(out * go).sum() + (psi * gp).sum()``; the launchers must match it in both
memory formats, with and without a gradient for psi, NaN for NaN, with poisoned
output buffers, bitwise across thread counts, and refuse bad inputs in C++.
"""
from __future__ import annotations


import pytest
import torch
from poison import poisoned_allocations

from r2unet_fast.ops import reference
from r2unet_fast.ops.dispatch import _cpu_import_reason

_reason = _cpu_import_reason()
if _reason is None:
    from r2unet_fast.ops import cpu
    from r2unet_fast.ops.extension import load_extension

    _C = load_extension()

    if not hasattr(_C, "attention_gate_fwd"):
        _reason = "r2unet_fast._C predates the attention gate kernel; rebuild it"
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"cpu: {_reason}")

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
NAMES = ("out", "psi", "dx", "dg", "dw_x", "dw_g", "dbias", "dw_psi", "db_psi")
CHUNK = 2048  # csrc/attention_gate.cpp kChunk: pixels per work item


def _inputs(n=2, cx=5, cg=7, f=3, h=13, w=9, dtype=torch.float64, fmt="nchw"):
    """x, g, the five weights, grad_out and grad_psi; drawn in float64, then cast."""
    mf = FORMATS[fmt]
    x = torch.randn(n, cx, h, w, dtype=torch.float64)
    g = torch.randn(n, cg, h, w, dtype=torch.float64)
    weights = [torch.randn(f, cx, dtype=torch.float64) / cx ** 0.5, torch.randn(f, cg, dtype=torch.float64) / cg ** 0.5,
               torch.randn(f, dtype=torch.float64), torch.randn(f, dtype=torch.float64),
               torch.randn(1, dtype=torch.float64)]
    go = torch.randn(n, cx, h, w, dtype=torch.float64)
    gp = torch.randn(n, 1, h, w, dtype=torch.float64)
    x, g, go = (t.to(dtype).contiguous(memory_format=mf) for t in (x, g, go))
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    return x, g, [t.to(wdtype) for t in weights], go, gp.to(dtype)


def _reference(x, g, weights, go, gp):
    """out, psi and the seven gradients by autograd through the reference (gp None: psi unused)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, g, *weights)]
    out, psi = reference.attention_gate(*leaves, return_psi=True)
    loss = (out * go).sum() + ((psi * gp).sum() if gp is not None else 0)
    grads = torch.autograd.grad(loss, leaves)
    return (out.detach(), psi.detach(), *grads)


def _fast(x, g, weights, go, gp):
    out, psi = cpu.attention_gate_fwd(x, g, *weights)
    grads = cpu.attention_gate_bwd(x, g, *weights, go, gp if gp is not None else x.new_empty(0))
    return (out, psi, *grads)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _assert_close(got, want, tol, names=NAMES):
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        scale = b.abs().max().item() or 1.0
        assert _max_err(a, b) <= tol * scale, f"{name}: error {_max_err(a, b):.3g} vs scale {scale:.3g}"


def _assert_layouts(got, x, g, weights):
    out, psi, dx, dg, *wgrads = got
    for t, like in ((out, x), (dx, x), (dg, g)):
        assert t.dtype == like.dtype and t.stride() == like.stride()
    assert psi.dtype == x.dtype and psi.is_contiguous() and psi.shape == (x.shape[0], 1, *x.shape[2:])
    for t, w in zip(wgrads, weights):
        assert t.dtype == w.dtype and t.shape == w.shape and t.is_contiguous()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("with_grad_psi", [True, False], ids=["grad_psi", "no_grad_psi"])
def test_float64_matches_the_reference(fmt, with_grad_psi):
    x, g, weights, go, gp = _inputs(fmt=fmt)
    gp = gp if with_grad_psi else None
    got = _fast(x, g, weights, go, gp)
    _assert_layouts(got, x, g, weights)
    _assert_close(got, _reference(x, g, weights, go, gp), 1e-12)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("with_grad_psi", [True, False], ids=["grad_psi", "no_grad_psi"])
@pytest.mark.parametrize("size", [
    dict(),  # Cx=5, Cg=7, F=3, 13x9, N=2
    dict(n=2, cx=64, cg=128, f=32, h=16, w=16),
    dict(n=2, cx=6, cg=3, f=4, h=47, w=53),  # 2491 pixels an image: two chunks, the second partial
], ids=["small", "wide", "two_chunks"])
def test_float32_matches_the_reference(fmt, with_grad_psi, size):
    # the float64 reference on the same float32 numbers: error <= 2 x the float32 reference's + a floor
    x, g, weights, go, gp = _inputs(dtype=torch.float32, fmt=fmt, **size)
    gp = gp if with_grad_psi else None
    got = _fast(x, g, weights, go, gp)
    _assert_layouts(got, x, g, weights)
    ref32 = _reference(x, g, weights, go, gp)
    exact = _reference(x.double(), g.double(), [w.double() for w in weights], go.double(),
                       gp.double() if gp is not None else None)
    for name, a, r, e in zip(NAMES, got, ref32, exact):
        assert torch.isfinite(a).all(), name
        floor = 2e-6 * e.abs().max().item()
        assert _max_err(a, e) <= 2 * _max_err(r, e) + floor, name


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size", [dict(n=1, cx=1, cg=3, f=1, h=1, w=1), dict(n=3, cx=2, cg=1, f=5, h=1, w=7),
                                  dict(n=1, cx=1, cg=2, f=2, h=2, w=2), dict(n=1, cx=3, cg=2, f=2, h=64, w=32)],
                         ids=["1x1", "cg1", "cx1", "one_full_chunk"])
def test_odd_shapes(fmt, size):
    # size-1 dims make a tensor contiguous in both formats; the kernel must still pick one layout for all
    x, g, weights, go, gp = _inputs(fmt=fmt, **size)
    got = _fast(x, g, weights, go, gp)
    _assert_layouts(got, x, g, weights)
    _assert_close(got, _reference(x, g, weights, go, gp), 1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_relu_kink_takes_the_references_subgradient(dtype):
    # a == 0 exactly (zero inputs, zero bias entries): relu'(0) = 0, so da = 0 there
    x, g, weights, go, gp = _inputs(dtype=dtype)
    x[:, :, 2:5], g[:, :, 2:5] = 0, 0
    weights[2][::2] = 0
    got = _fast(x, g, weights, go, gp)
    _assert_close(got, _reference(x, g, weights, go, gp), 1e-12 if dtype == torch.float64 else 2e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b_psi", [-300.0, -95.0, 95.0, 300.0])
def test_saturated_gate_stays_finite(dtype, b_psi):
    x, g, weights, go, gp = _inputs(dtype=dtype, fmt="channels_last")
    weights[4].fill_(b_psi)
    got = _fast(x, g, weights, go, gp)
    want = _reference(x, g, weights, go, gp)
    for name, a, b in zip(NAMES, got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-30, msg=name)


def _assert_same_nans(got, want, tol):
    for name, a, b in zip(NAMES, got, want):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaNs in other places than the reference's"
        keep = ~torch.isnan(b)
        scale = b[keep].abs().max().item() if keep.any() else 1.0
        torch.testing.assert_close(a[keep].double(), b[keep].double(), rtol=tol, atol=tol * scale, msg=name)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("where", ["x", "g", "x_negative_nan", "grad_out", "grad_psi"])
def test_nan_inputs_give_the_references_nans(fmt, dtype, where):
    x, g, weights, go, gp = _inputs(dtype=dtype, fmt=fmt)
    nan = float("nan")
    if where == "x":
        x[1, 3, 4, 5] = nan
    elif where == "g":
        g[0, 6, 12, 0] = nan
    elif where == "x_negative_nan":  # a NaN with its sign bit set stays NaN through relu
        x[0, 0, 0, 0] = -nan
        x[1, 2, 7, 3] = -nan
    elif where == "grad_out":  # dq NaN at one pixel: da is NaN where a > 0 there and 0 where a <= 0
        go[1, 0, 3, 3] = nan
    else:
        gp[0, 0, 5, 5] = nan
    want = _reference(x, g, weights, go, gp)
    assert any(torch.isnan(t).any() for t in want)
    _assert_same_nans(_fast(x, g, weights, go, gp), want, 1e-12 if dtype == torch.float64 else 2e-5)


@pytest.mark.parametrize("which", [2, 3, 4])  # bias, w_psi, b_psi
def test_nan_weights_give_the_references_nans(which):
    x, g, weights, go, gp = _inputs(fmt="channels_last")
    weights[which][0] = float("nan")
    want = _reference(x, g, weights, go, gp)
    _assert_same_nans(_fast(x, g, weights, go, gp), want, 1e-12)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("with_grad_psi", [True, False], ids=["grad_psi", "no_grad_psi"])
def test_output_buffers_are_fully_written(fmt, with_grad_psi, monkeypatch):
    x, g, weights, go, gp = _inputs(dtype=torch.float32, fmt=fmt, h=47, w=53)
    gp = gp if with_grad_psi else None
    with poisoned_allocations(monkeypatch):
        assert torch.isnan(torch.empty(2)).all()
        got = _fast(x, g, weights, go, gp)
    _assert_close(got, _reference(x.double(), g.double(), [w.double() for w in weights], go.double(),
                                  gp.double() if gp is not None else None), 2e-5)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_ratio_rule(fmt, dtype):
    # computed in float32: error(fast vs float64 reference) <= 2 x error(reference in dtype vs it) + floor
    x, g, weights, go, gp = _inputs(fmt=fmt, cx=16, cg=8, f=8)
    exact = _reference(x, g, weights, go, gp)
    lo = [t.to(dtype) for t in (x, g)]
    lo_go, lo_gp = go.to(dtype), gp.to(dtype)
    ref_lo = _reference(*lo, [w.to(dtype) for w in weights], lo_go, lo_gp)
    fast_lo = _fast(*lo, [w.float() for w in weights], lo_go, lo_gp)
    _assert_layouts(fast_lo, *lo, [w.float() for w in weights])
    for name, f, r, e in zip(NAMES, fast_lo, ref_lo, exact):
        assert torch.isfinite(f).all(), name
        floor = 1e-6 * e.abs().max().item()
        assert _max_err(f, e) <= 2 * _max_err(r, e) + floor, name


@pytest.mark.parametrize("fmt", FORMATS)
def test_deterministic_across_thread_counts(fmt):
    x, g, weights, go, gp = _inputs(n=3, cx=16, cg=8, f=8, h=47, w=53, dtype=torch.float32, fmt=fmt)
    assert 47 * 53 > CHUNK
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, max(2, threads), max(2, threads)):
            torch.set_num_threads(n)
            runs.append(_fast(x, g, weights, go, gp))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for name, a, b in zip(NAMES, runs[0], run):
            assert torch.equal(a, b), name


class _Gate(torch.autograd.Function):
    """The launchers as an autograd function, for gradcheck."""

    @staticmethod
    def forward(ctx, x, g, w_x, w_g, bias, w_psi, b_psi):
        ctx.save_for_backward(x, g, w_x, w_g, bias, w_psi, b_psi)
        return cpu.attention_gate_fwd(x, g, w_x, w_g, bias, w_psi, b_psi)

    @staticmethod
    def backward(ctx, grad_out, grad_psi):
        x, g, *weights = ctx.saved_tensors
        fmt = torch.channels_last if not x.is_contiguous() else torch.contiguous_format
        return cpu.attention_gate_bwd(x, g, *weights, grad_out.contiguous(memory_format=fmt),
                                      grad_psi.contiguous())


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradcheck_float64(fmt):
    x, g, weights, _, _ = _inputs(n=2, cx=3, cg=2, f=4, h=3, w=5, fmt=fmt)
    leaves = [t.clone().requires_grad_() for t in (x, g, *weights)]
    assert torch.autograd.gradcheck(_Gate.apply, leaves)


def test_cpp_checks_its_inputs():
    x, g, weights, go, gp = _inputs(dtype=torch.float32)
    w_x, w_g, bias, w_psi, b_psi = weights

    def fwd(x=x, g=g, w_x=w_x, w_g=w_g, bias=bias, w_psi=w_psi, b_psi=b_psi, out=None, psi=None):
        out = torch.empty_like(x) if out is None else out
        psi = torch.empty(x.shape[0], 1, *x.shape[2:], dtype=x.dtype) if psi is None else psi
        _C.attention_gate_fwd(x, g, w_x, w_g, bias, w_psi, b_psi, out, psi)

    def bwd(grad_out=go, grad_psi=gp, dx=None, dw_x=None):
        dx = torch.empty_like(x) if dx is None else dx
        dw_x = torch.empty_like(w_x) if dw_x is None else dw_x
        _C.attention_gate_bwd(x, g, *weights, grad_out, grad_psi, dx, torch.empty_like(g), dw_x,
                              torch.empty_like(w_g), torch.empty_like(bias), torch.empty_like(w_psi),
                              torch.empty_like(b_psi))

    fwd()
    bwd(grad_psi=None)
    cl = torch.channels_last
    cases = [
        (dict(x=x.long(), g=g.long()), "x must be float32 or float64"),
        (dict(g=g.double()), "g must have x's dtype"),
        (dict(x=x[0]), "must be 4-D"),
        (dict(g=g[:, :, :5]), "must share N, H and W"),
        (dict(x=x[:, :0]), "non-empty"),
        (dict(g=g.contiguous(memory_format=cl)), "must both be contiguous \\(NCHW\\) or both channels_last"),
        (dict(x=x[:, :, ::2], g=g[:, :, ::2]), "must both be contiguous \\(NCHW\\) or both channels_last"),
        (dict(w_x=w_x.double()), "w_x must have dtype Float"),
        (dict(w_x=w_x[:, :4]), "w_x must have shape"),
        (dict(w_g=w_g[:2]), "w_g must have shape"),
        (dict(w_x=w_x.t().contiguous().t()), "w_x must be contiguous"),
        (dict(b_psi=torch.zeros(2)), "b_psi must have shape"),
        (dict(w_psi=w_psi.to("meta")), "w_psi must be a CPU tensor"),
        (dict(out=torch.empty_like(x, memory_format=cl)), "out must be contiguous \\(NCHW\\)"),
        (dict(out=torch.empty_like(x, dtype=torch.float64)), "out must have dtype"),
        (dict(psi=torch.empty(2, 13, 9)), "psi must have shape"),
    ]
    for kwargs, match in cases:
        with pytest.raises(RuntimeError, match=match):
            fwd(**kwargs)
    with pytest.raises(RuntimeError, match="grad_out must be contiguous \\(NCHW\\)"):
        bwd(grad_out=go.contiguous(memory_format=cl))
    with pytest.raises(RuntimeError, match="grad_psi must have shape"):
        bwd(grad_psi=gp[:, :, :4])
    with pytest.raises(RuntimeError, match="dx must have dtype"):
        bwd(dx=torch.empty_like(x, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="dw_x must have dtype"):
        bwd(dw_x=torch.empty_like(w_x, dtype=torch.float64))
    xl, gl = x.contiguous(memory_format=cl), g.contiguous(memory_format=cl)
    with pytest.raises(RuntimeError, match="grad_out must be channels_last"):
        cpu.attention_gate_bwd(xl, gl, *weights, go, gp)
    with pytest.raises(RuntimeError, match="w_x must have dtype"):  # float64 x needs float64 weights
        cpu.attention_gate_fwd(x.double(), g.double(), *weights)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 13, 9), (1, 6, 4, 5, 47, 53)], ids=["one_chunk", "two_chunks"])
def test_kept_preactivation_gives_the_recomputed_gradients(fmt, shape):
    n, cx, cg, f, h, w = shape
    x, g, weights, go, gp = _inputs(n, cx, cg, f, h, w, torch.float32, fmt)
    assert cpu.attention_gate_kept_numel(n, h, w, f) == _C.attention_gate_kept_numel(n, h, w, f)
    out, psi, kept = cpu.attention_gate_fwd_kept(x, g, *weights)
    plain_out, plain_psi = cpu.attention_gate_fwd(x, g, *weights)
    assert torch.equal(out, plain_out) and torch.equal(psi, plain_psi)
    before = kept.clone()
    recomputed = cpu.attention_gate_bwd(x, g, *weights, go, gp)
    for _ in range(2):  # a second backward (retain_graph) must find the buffer intact
        read = cpu.attention_gate_bwd_kept(x, g, *weights, kept, go, gp)
        for name, a, b in zip(NAMES[2:], read, recomputed):
            assert torch.equal(a, b), name
    assert torch.equal(kept, before), "backward must not overwrite the kept buffer"


def test_kept_buffer_of_the_wrong_size_is_refused():
    x, g, weights, go, gp = _inputs(dtype=torch.float32)
    _, _, kept = cpu.attention_gate_fwd_kept(x, g, *weights)
    with pytest.raises(RuntimeError, match="kept must be"):
        cpu.attention_gate_bwd_kept(x, g, *weights, kept[1:], go, gp)
