"""Launcher-level tests of the Triton recurrent conv step (``ops/triton/recurrent_conv.py``).

Run through the interpreter on CPU tensors here (conftest sets TRITON_INTERPRET), compiled on
CUDA tensors where a GPU exists. The ground truth is ``recurrent_conv_oracle`` (float64 torch):
parity per dtype, layout and optional argument, shapes beyond one tile / channel block / chunk,
the grid-cap loops, the large-mean statistics, determinism, in-place semantics, poisoned
buffers, NaN and inf, the bf16/fp16 ratio rule, validation, and the backward against autograd.
"""
from __future__ import annotations

import pytest
import recurrent_conv_oracle as oracle
import torch
import torch.nn.functional as F
from backend_cases import cases
from poison import poisoned_allocations

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


def _bwd_both(s, dh, vec, dfeed, write_ds):
    """(ds, sum_dy, sum_dy_xhat, dfeed after) from the launcher and from the oracle."""
    mine, theirs = (None, None) if dfeed is None else (dfeed.clone(), dfeed.clone())
    args = [vec[k] for k in ("scale", "shift", "mean", "rstd", "gamma")]
    got = _rc().rc_bn_relu_bwd(s, dh, *args, mine, write_ds)
    want = oracle.rc_bn_relu_bwd(s, dh, *args, theirs, write_ds)
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_feed", [True, False], ids=["feed", "no_feed"])
@LAYOUTS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_stats_matches_the_oracle(backend, dtype, channels_last, with_feed):
    acts, _ = _inputs(dtype=dtype, device=backend.device, channels_last=channels_last)
    got, want = _add_stats_both(acts["s"], acts["feed"] if with_feed else None)
    _check_all(ADD_STATS_NAMES, got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("with_feed", [True, False], ids=["feed", "no_feed"])
@LAYOUTS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_relu_matches_the_oracle(backend, dtype, channels_last, with_feed, with_residual):
    acts, vec = _inputs(dtype=dtype, device=backend.device, channels_last=channels_last)
    args = (acts["s"], acts["feed"] if with_feed else None, vec["scale"], vec["shift"],
            acts["residual"] if with_residual else None)
    _assert_close("h", _rc().rc_bn_relu(*args), oracle.rc_bn_relu(*args))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("write_ds", [True, False], ids=["ds", "no_ds"])
@pytest.mark.parametrize("with_dfeed", [True, False], ids=["dfeed", "no_dfeed"])
@LAYOUTS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_relu_bwd_matches_the_oracle(backend, dtype, channels_last, with_dfeed, write_ds):
    acts, vec = _inputs(dtype=dtype, device=backend.device, channels_last=channels_last)
    got, want = _bwd_both(acts["s"], acts["dh"], vec, acts["dfeed"] if with_dfeed else None, write_ds)
    _check_all(BWD_NAMES, got, want)


def _all_three(acts, vec):
    """Every launcher with every optional argument, against the oracle."""
    got, want = _add_stats_both(acts["s"], acts["feed"])
    _check_all(ADD_STATS_NAMES, got, want)
    args = (acts["s"], acts["feed"], vec["scale"], vec["shift"], acts["residual"])
    _assert_close("h", _rc().rc_bn_relu(*args), oracle.rc_bn_relu(*args))
    got, want = _bwd_both(acts["s"], acts["dh"], vec, acts["dfeed"], True)
    _check_all(BWD_NAMES, got, want)


# Under the interpreter (4 programs wanted per launch; tiles of 64 pixels, channel blocks of 32):
# (2, 40, 17, 9): 3 pixel tiles (one partial) per image, 2 channel blocks, 1 chunk;
# (1, 40, 17, 9): 2 chunks, of 2 tiles and of 1 partial tile;
# (2, 6, 20, 11): 2 chunks per image, each 2 tiles, the last one partial.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 40, 17, 9), (1, 40, 17, 9), (2, 6, 20, 11)], ids=str)
@LAYOUTS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_beyond_one_tile_channel_block_and_chunk(backend, dtype, shape, channels_last):
    _all_three(*_inputs(shape, dtype, backend.device, channels_last))


@pytest.mark.parametrize("backend", BACKENDS)
@LAYOUTS
def test_tile_and_channel_loops_beyond_the_grid_cap(backend, channels_last, monkeypatch):
    # grid axes 1 and 2 stop at MAX_GRID_1: beyond, each program loops over tiles and channel blocks
    monkeypatch.setattr(_rc(), "MAX_GRID_1", 1)
    _all_three(*_inputs((2, 40, 17, 9), torch.float64, backend.device, channels_last))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 1, 7, 1), (2, 4, 1, 6)], ids=["1x1", "Wx1", "1xW"])
@LAYOUTS
def test_degenerate_shapes(backend, shape, channels_last):
    # size-1 dims have free strides in torch: the launchers must not read them
    _all_three(*_inputs(shape, torch.float64, backend.device, channels_last))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("outlier_first", [False, True], ids=["plain", "outlier_first_pixel"])
@pytest.mark.parametrize("with_feed", [True, False], ids=["feed", "no_feed"])
@LAYOUTS
def test_statistics_of_a_large_mean_keep_fp32_accuracy(backend, channels_last, with_feed, outlier_first):
    # mean 1e4, std 1 in fp32: sum(x^2)/M - mean^2 would lose every digit of the variance
    gen = torch.Generator().manual_seed(5)
    shape = (2, 6, 33, 31)
    out = _act(shape, torch.float32, backend.device, channels_last, gen, loc=1e4)
    if outlier_first:  # the first pixel of each chunk is a shift candidate: make one 30 std off
        out[:, :, 0, 0] += 30.0
    feed = _act(shape, torch.float32, backend.device, channels_last, gen, std=0.5) if with_feed else None
    got, want = _add_stats_both(out, feed)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=0)
    x = want[0]
    naive = (x * x).mean(DIMS) - x.mean(DIMS) ** 2
    assert ((naive.double() - want[2].double()).abs() / want[2].double()).max() > 1e-2  # the test can tell


@pytest.mark.parametrize("backend", BACKENDS)
@LAYOUTS
def test_two_calls_give_identical_bits(backend, channels_last):
    acts, vec = _inputs((2, 40, 17, 9), torch.float32, backend.device, channels_last)
    runs = []
    for _ in range(2):
        out, dfeed = acts["s"].clone(), acts["dfeed"].clone()
        stats = _rc().rc_add_stats(out, acts["feed"])
        h = _rc().rc_bn_relu(out, acts["feed"], vec["scale"], vec["shift"], acts["residual"])
        bwd = _rc().rc_bn_relu_bwd(out, acts["dh"], *[vec[k] for k in ("scale", "shift", "mean", "rstd", "gamma")],
                                   dfeed, True)
        runs.append((out, *stats, h, *bwd, dfeed))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@LAYOUTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_only_out_and_dfeed_are_written_in_place(backend, dtype, channels_last):
    acts, vec = _inputs(dtype=dtype, device=backend.device, channels_last=channels_last)
    before = {k: t.clone() for k, t in {**acts, **vec}.items()}
    rc = _rc()
    out = acts["s"].clone()
    expected_out = out.clone()
    oracle.rc_add_stats(expected_out, acts["feed"])
    pointer = out.data_ptr()
    rc.rc_add_stats(out, acts["feed"])
    assert out.data_ptr() == pointer and torch.equal(out, expected_out)
    h = rc.rc_bn_relu(acts["s"], acts["feed"], vec["scale"], vec["shift"], acts["residual"])
    assert h.data_ptr() not in {t.data_ptr() for t in acts.values()}
    dfeed = acts["dfeed"]
    expected_dfeed = dfeed.clone()
    args = (acts["s"], acts["dh"], *[vec[k] for k in ("scale", "shift", "mean", "rstd", "gamma")])
    oracle.rc_bn_relu_bwd(*args, expected_dfeed, False)
    ds, *_ = rc.rc_bn_relu_bwd(*args, dfeed, False)
    assert ds.numel() == 0 and ds.dtype == dtype
    _assert_close("dfeed", dfeed, expected_dfeed)
    for name, t in {**acts, **vec}.items():
        if name != "dfeed":
            assert torch.equal(t, before[name]), f"{name} was modified"


@pytest.mark.parametrize("backend", BACKENDS)
@LAYOUTS
def test_output_buffers_are_fully_written(backend, channels_last, monkeypatch):
    # every torch.empty (outputs and partial buffers) starts as NaN: any element not written shows
    acts, vec = _inputs((2, 40, 17, 9), torch.float32, backend.device, channels_last)
    with poisoned_allocations(monkeypatch):
        assert torch.isnan(torch.empty(2, device=backend.device)).all()
        _all_three(acts, vec)


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


def _bad_cases(device):
    acts, vec = _inputs(dtype=torch.float32, device=device)
    s, dh = acts["s"], acts["dh"]
    v = [vec[k] for k in ("scale", "shift", "mean", "rstd", "gamma")]
    meta = torch.empty(s.shape, device="meta")
    rc = _rc()
    return {
        "feed_shape": (lambda: rc.rc_add_stats(s, s[:, :4].contiguous()), "feed must have shape"),
        "feed_dtype": (lambda: rc.rc_add_stats(s, s.double()), "feed must have out's dtype"),
        "feed_device": (lambda: rc.rc_add_stats(s, meta), "inputs must be on one device.*feed on meta"),
        "residual_shape": (lambda: rc.rc_bn_relu(s, None, *v[:2], s[:1]), "residual must have shape"),
        "scale_dtype": (lambda: rc.rc_bn_relu(s, None, v[0].double(), v[1], None),
                        "scale must be in the compute dtype torch.float32"),
        "shift_shape": (lambda: rc.rc_bn_relu(s, None, v[0], torch.zeros(6, device=device), None),
                        r"shift must have shape \(5,\)"),
        "gamma_device": (lambda: rc.rc_bn_relu_bwd(s, dh, *v[:4], torch.empty(5, device="meta"), None, True),
                         "inputs must be on one device.*gamma on meta"),
        "rstd_strided": (lambda: rc.rc_bn_relu_bwd(s, dh, *v[:3], torch.ones(10, device=device)[::2], v[4], None,
                                                   True), "rstd must be contiguous"),
        "dh_dtype": (lambda: rc.rc_bn_relu_bwd(s, dh.half(), *v, None, True), "dh must have s's dtype"),
        "dfeed_strided": (lambda: rc.rc_bn_relu_bwd(s, dh, *v, torch.zeros(2, 5, 7, 18, device=device)[..., ::2],
                                                    True), "dfeed must be NCHW-contiguous or channels_last"),
        "s_3d": (lambda: rc.rc_bn_relu(s[0], None, *v[:2], None), r"s must be 4-D \(N, C, H, W\)"),
        "s_int": (lambda: rc.rc_add_stats(s.int(), None), "out must be float16, bfloat16, float32 or float64"),
        "s_empty": (lambda: rc.rc_add_stats(s[:0], None), "out has no elements"),
        "feed_not_tensor": (lambda: rc.rc_add_stats(s, 1.0), "feed must be a torch.Tensor or None"),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_bad_cases("cpu")))
def test_bad_inputs_raise_a_value_error_naming_the_problem(backend, case):
    call, message = _bad_cases(backend.device)[case]
    with pytest.raises(ValueError, match=message):
        call()


def _no_autotuner(arch: str):
    raise AssertionError("the autotuner ran")


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_tiles_run_unless_autotuning_is_asked_for(backend, monkeypatch):
    from r2unet_fast.ops.triton import tuning

    rc = _rc()
    monkeypatch.setattr(rc, "TUNED_TILES", {})
    for name in [n for n in vars(rc) if n.endswith("_tuners")]:
        monkeypatch.setattr(rc, name, _no_autotuner)
    monkeypatch.setattr(tuning, "AUTOTUNE", False)
    acts, vec = _inputs(dtype=torch.float32, device=backend.device)
    _all_three(acts, vec)  # every kernel launches its default tile
    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    with pytest.raises(AssertionError, match="the autotuner ran"):
        _all_three(acts, vec)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tuned_configs_name_the_four_tuned_kernels(backend):
    assert set(_rc().tuned_configs()) == {"add_stats", "bn_relu", "bwd_reduce", "bwd_apply"}
