"""Numerics of the Triton recurrent conv launchers: NaN and inf as the oracle, the bf16/fp16 ratio
rule, half outputs rounded once to nearest even, and the backward against autograd of batch_norm + relu."""
from __future__ import annotations

import pytest
import recurrent_conv_oracle as oracle
import torch
import torch.nn.functional as F
from recurrent_conv_triton_support import (ADD_STATS_NAMES, BACKENDS, BWD_NAMES, DIMS, EPS, LAYOUTS, _add_stats_both,
                                           _assert_close, _bwd_both, _inputs, _rc)


def _with_nonfinite(case, acts):
    acts = {k: t.clone() for k, t in acts.items()}
    if case == "nan_s":
        acts["s"][1, 2, 4, 3] = float("nan")
    elif case == "inf_s":
        acts["s"][0, 1, 2, 5] = float("inf")
    elif case == "inf_first_pixel":  # the shift of a chunk: it must not turn the channel's mean into NaN
        acts["s"][0, 3, 0, 0] = float("-inf")
    elif case == "both_infs":
        acts["s"][0, 0, 1, 1] = float("inf")
        acts["s"][1, 0, 6, 8] = float("-inf")
    elif case == "nan_feed":
        acts["feed"][0, 4, 6, 0] = float("nan")
    elif case == "nan_residual":
        acts["residual"][1, 0, 3, 3] = float("nan")
    elif case == "nan_dh":
        acts["dh"][0, 2, 1, 1] = float("nan")
        acts["dh"][1, 2, 5, 5] = float("inf")
    return acts


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["nan_s", "inf_s", "inf_first_pixel", "both_infs", "nan_feed", "nan_residual",
                                  "nan_dh"])
@LAYOUTS
def test_nonfinite_inputs_match_the_oracle(backend, case, channels_last):
    acts, vec = _inputs(device=backend.device, channels_last=channels_last)
    acts = _with_nonfinite(case, acts)
    got, want = _add_stats_both(acts["s"], acts["feed"])
    got_h = _rc().rc_bn_relu(acts["s"], acts["feed"], vec["scale"], vec["shift"], acts["residual"])
    want_h = oracle.rc_bn_relu(acts["s"], acts["feed"], vec["scale"], vec["shift"], acts["residual"])
    got_b, want_b = _bwd_both(acts["s"], acts["dh"], vec, acts["dfeed"], True)
    for name, a, b in zip(ADD_STATS_NAMES + ("h",) + BWD_NAMES, (*got, got_h, *got_b), (*want, want_h, *want_b)):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaN pattern differs"
        assert torch.equal(torch.isinf(a), torch.isinf(b)), f"{name}: inf pattern differs"
        _assert_close(name, a, b)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _eager(acts, vec, dtype):
    """The three passes as eager torch statements in ``dtype`` (vectors rounded to it)."""
    lo = {k: v.to(dtype).view(1, -1, 1, 1) for k, v in vec.items()}
    s, feed, residual, dh, dfeed = (acts[k] for k in ("s", "feed", "residual", "dh", "dfeed"))
    out = s + feed
    var, mean = torch.var_mean(out, DIMS, correction=0)
    h = torch.relu((s + feed) * lo["scale"] + lo["shift"]) + residual
    dy = torch.where(s * lo["scale"] + lo["shift"] <= 0, 0.0, dh)
    xhat = (s - lo["mean"]) * lo["rstd"]
    m = s.numel() // s.shape[1]
    sum_dy, sum_dy_xhat = dy.sum(DIMS, keepdim=True), (dy * xhat).sum(DIMS, keepdim=True)
    ds = lo["gamma"] * lo["rstd"] * (dy - sum_dy / m - xhat * sum_dy_xhat / m)
    return out, mean, var, h, ds, sum_dy.flatten(), sum_dy_xhat.flatten(), dfeed + ds


def _fast_and_exact(acts, vec):
    """The launchers' results and the oracle's on float64 copies of the same inputs (unrounded)."""
    out = acts["s"].clone()
    stats = _rc().rc_add_stats(out, acts["feed"])
    h = _rc().rc_bn_relu(acts["s"], acts["feed"], vec["scale"], vec["shift"], acts["residual"])
    fast = (out, *stats, h, *_bwd_both(acts["s"], acts["dh"], vec, acts["dfeed"], True)[0])
    acts, vec = {k: t.double() for k, t in acts.items()}, {k: t.double() for k, t in vec.items()}
    out = acts["s"].clone()
    stats = oracle.rc_add_stats(out, acts["feed"])
    h = oracle.rc_bn_relu(acts["s"], acts["feed"], vec["scale"], vec["shift"], acts["residual"])
    return fast, (out, *stats, h, *_bwd_both(acts["s"], acts["dh"], vec, acts["dfeed"], True)[1])


FAST_NAMES = ("out", "mean", "var", "h", "ds", "sum_dy", "sum_dy_xhat", "dfeed")


@pytest.mark.parametrize("backend", BACKENDS)
@LAYOUTS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_ratio_rule(backend, dtype, channels_last):
    # error(fast vs float64 oracle) <= 2 x error(eager torch in dtype vs the oracle) + a floor of
    # 1/8 ulp of the largest value (against an eager result that happens to be exact). The oracle
    # runs on float64 copies of the same half inputs, so rounding the inputs is no one's error.
    acts, vec = _inputs((2, 6, 20, 11), dtype, backend.device, channels_last)
    fast, exact = _fast_and_exact(acts, vec)
    eager = _eager(acts, vec, dtype)
    eps = torch.finfo(dtype).eps
    for name, f, r, e in zip(FAST_NAMES, fast, eager, exact):
        ours, theirs = _max_err(f, e), _max_err(r, e)
        floor = eps / 8 * e.abs().max().item()
        assert ours <= 2 * theirs + floor, f"{name}: {ours:.3g} vs eager {dtype} {theirs:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_outputs_are_rounded_once_to_nearest_even(backend, dtype):
    # computed in fp32 and rounded once: against the float64 value rounded by torch (nearest even),
    # an element may differ by one unit only where fp32 sat at a tie
    acts, vec = _inputs((2, 6, 20, 11), dtype, backend.device)
    fast, exact = _fast_and_exact(acts, vec)
    for name, f, e in zip(FAST_NAMES, fast, exact):
        if f.dtype == dtype:
            assert (f != e.to(dtype)).double().mean().item() < 0.01, name


@pytest.mark.parametrize("backend", BACKENDS)
@LAYOUTS
def test_backward_is_autograd_of_batch_norm_relu(backend, channels_last):
    # the contract itself: ds and the sums are autograd's gradients of relu(batch_norm(s)) in
    # training mode, with the statistics that rc_add_stats takes
    acts, vec = _inputs(device=backend.device, channels_last=channels_last)
    s = acts["s"].clone()
    mean, var = _rc().rc_add_stats(s, None)
    rstd = (var + EPS).rsqrt()
    gamma, beta = vec["gamma"], 0.5 * vec["shift"]
    scale = gamma * rstd
    ds, sum_dy, sum_dy_xhat = _rc().rc_bn_relu_bwd(s, acts["dh"], scale, beta - mean * scale, mean, rstd, gamma,
                                                   None, True)
    leaves = [t.detach().clone().requires_grad_() for t in (s, gamma, beta)]
    h = torch.relu(F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], training=True, eps=EPS))
    want = torch.autograd.grad((h * acts["dh"]).sum(), leaves)
    for name, a, b in zip(("ds", "dgamma", "dbeta"), (ds, sum_dy_xhat, sum_dy), want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")

