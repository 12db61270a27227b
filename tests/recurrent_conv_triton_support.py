"""Shared inputs and comparisons of the Triton recurrent-conv launcher tests (test_recurrent_conv_triton*.py)."""
from __future__ import annotations

import pytest
import recurrent_conv_oracle as oracle
import torch
from backend_cases import cases

BACKENDS = cases(None, ("triton",))
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
# (rtol, atol per unit of the largest expected magnitude) per dtype of the compared tensors;
# half-precision outputs are rounded once, so one unit in the last place
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
SMALL = (2, 5, 7, 9)
EPS = 1e-5
DIMS = (0, 2, 3)


def _rc():
    from r2unet_fast.ops.triton import recurrent_conv
    return recurrent_conv


def _fmt(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _act(shape, dtype, device, channels_last, gen, loc=0.0, std=1.0):
    """Drawn in float64 on the CPU (the same numbers on every device), then cast and laid out."""
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * std + loc
    return t.to(device, dtype).contiguous(memory_format=_fmt(channels_last))


def _inputs(shape=SMALL, dtype=torch.float64, device="cpu", channels_last=False, seed=0):
    """Activations s, feed, residual, dh, dfeed and BatchNorm vectors from s's batch statistics."""
    gen = torch.Generator().manual_seed(seed)
    acts = {name: _act(shape, dtype, device, channels_last, gen) for name in ("s", "feed", "residual", "dh", "dfeed")}
    acc = oracle.compute_dtype(acts["s"])
    c = shape[1]
    gamma = (1 + 0.5 * torch.randn(c, generator=gen, dtype=torch.float64)).to(device, acc)
    beta = (0.5 * torch.randn(c, generator=gen, dtype=torch.float64)).to(device, acc)
    s64 = acts["s"].double()
    mean = s64.mean(DIMS).to(acc)
    rstd = (s64.var(DIMS, unbiased=False) + EPS).rsqrt().to(acc)
    scale = gamma * rstd
    return acts, {"scale": scale, "shift": beta - mean * scale, "mean": mean, "rstd": rstd, "gamma": gamma}


def _assert_close(name, got, want):
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape, got.dtype, want.dtype)
    if got.dim() == 4:
        assert got.is_contiguous(memory_format=oracle._layout(want)), f"{name}: strides {got.stride()}"
    tol = TOL[got.dtype]
    finite = want[torch.isfinite(want)].double()
    scale = max(finite.abs().max().item() if finite.numel() else 0.0, 1.0)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, equal_nan=True,
                               msg=lambda m: f"{name}: {m}")


def _add_stats_both(out, feed):
    """(out after, mean, var) from the launcher and from the oracle, each on its own copy of out."""
    mine, theirs = out.clone(), out.clone()
    got = _rc().rc_add_stats(mine, feed)
    want = oracle.rc_add_stats(theirs, feed)
    return (mine, *got), (theirs, *want)


def _bwd_both(s, dh, vec, dfeed, write_ds, ds_into_dh=False):
    """(ds, sum_dy, sum_dy_xhat, dfeed after) from the launcher and from the oracle; with
    ``ds_into_dh`` each side writes ds over its own copy of dh, and the launcher's ds must be it."""
    mine, theirs = (None, None) if dfeed is None else (dfeed.clone(), dfeed.clone())
    args = [vec[k] for k in ("scale", "shift", "mean", "rstd", "gamma")]
    dh_mine, dh_theirs = (dh.clone(), dh.clone()) if ds_into_dh else (dh, dh)
    got = _rc().rc_bn_relu_bwd(s, dh_mine, *args, mine, write_ds, ds_into_dh=ds_into_dh)
    want = oracle.rc_bn_relu_bwd(s, dh_theirs, *args, theirs, write_ds, ds_into_dh=ds_into_dh)
    if ds_into_dh:
        assert got[0].data_ptr() == dh_mine.data_ptr()
    return (*got, mine), (*want, theirs)


def _check_all(names, got, want):
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, name
        elif b.numel() == 0:
            assert a.numel() == 0 and a.dtype == b.dtype, name
        else:
            _assert_close(name, a, b)


ADD_STATS_NAMES = ("out", "mean", "var")
BWD_NAMES = ("ds", "sum_dy", "sum_dy_xhat", "dfeed")


def _all_three(acts, vec):
    """Every launcher with every optional argument, against the oracle."""
    got, want = _add_stats_both(acts["s"], acts["feed"])
    _check_all(ADD_STATS_NAMES, got, want)
    args = (acts["s"], acts["feed"], vec["scale"], vec["shift"], acts["residual"])
    _assert_close("h", _rc().rc_bn_relu(*args), oracle.rc_bn_relu(*args))
    got, want = _bwd_both(acts["s"], acts["dh"], vec, acts["dfeed"], True)
    _check_all(BWD_NAMES, got, want)
