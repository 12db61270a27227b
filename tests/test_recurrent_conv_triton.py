"""Launcher-level tests of the Triton recurrent conv step (``ops/triton/recurrent_conv.py``).

Run through the interpreter on CPU tensors here (conftest sets TRITON_INTERPRET), compiled on
CUDA tensors where a GPU exists. The ground truth is ``recurrent_conv_oracle`` (float64 torch):
parity per dtype, layout and optional argument, shapes beyond one tile / channel block / chunk,
the grid-cap loops, the large-mean statistics, determinism, in-place semantics, poisoned
buffers and validation.
Their numerics (NaN and inf, the ratio rule, rounding, autograd) are in test_recurrent_conv_triton_numerics.py.
"""
from __future__ import annotations

import pytest
import recurrent_conv_oracle as oracle
import torch
from poison import poisoned_allocations
from recurrent_conv_triton_support import (ADD_STATS_NAMES, BACKENDS, BWD_NAMES, DIMS, DTYPES, LAYOUTS, _act,
                                           _add_stats_both, _all_three, _assert_close, _bwd_both, _check_all, _inputs, _rc)


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


@pytest.mark.parametrize("backend", BACKENDS)
@LAYOUTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bn_relu_bwd_can_write_ds_over_dh(backend, dtype, channels_last):
    # the recurrent conv's backward hands over a dh it owns; ds replaces it in place
    acts, vec = _inputs(dtype=dtype, device=backend.device, channels_last=channels_last)
    got, want = _bwd_both(acts["s"], acts["dh"], vec, acts["dfeed"], True, ds_into_dh=True)
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
