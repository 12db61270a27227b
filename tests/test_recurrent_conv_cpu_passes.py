"""The recurrent conv unit's C++ passes (``r2unet_fast.ops.cpu``) against their float64 statements
(tests/recurrent_conv_oracle.py), in both compiled versions (AVX2 + FMA and the baseline): add +
statistics, BatchNorm + ReLU and its backward, a step's statistics and affine in one call, the ReLU
mask at exactly zero, no cancellation at a large mean, and the running-statistics update's checks.
The unit and block built on them: tests/test_recurrent_conv.py.
"""
from __future__ import annotations

import pytest
import recurrent_conv_oracle as oracle
import torch
from unit_parity import assert_all_close, randn_input

from r2unet_fast import ops
from r2unet_fast.ops.library import recurrent_conv_steps as steps

_CPP_REASON = ops.available_backends("recurrent_conv", "cpu")["cpu"]
requires_cpp = pytest.mark.skipif(_CPP_REASON is not None, reason=f"cpu backend: {_CPP_REASON}")


@pytest.fixture(params=["avx2", "baseline"])
def cpu(request):
    """The C++ launchers, their kernels in the version under test: AVX2 + FMA (where the CPU has
    it) or the baseline that CPUs without it run."""
    from r2unet_fast.ops import cpu as launchers

    if request.param == "baseline":
        with launchers.baseline_kernels():
            yield launchers
        return
    if not launchers.avx2_kernels():
        pytest.skip("this CPU has no AVX2 + FMA")
    yield launchers


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_extras", [False, True], ids=["plain", "feed_residual_dfeed"])
@requires_cpp
def test_cpu_passes_match_their_statements(channels_last, dtype, with_extras, cpu):
    out = randn_input(2, 6, 7, 9, dtype=torch.float64, channels_last=channels_last) * 3 + 2
    feed = randn_input(2, 6, 7, 9, channels_last=channels_last)
    out, feed = out.to(dtype), feed.to(dtype)
    extra = feed if with_extras else None
    got, want = out.clone(), out.clone()
    stats = cpu.rc_add_stats(got, extra), oracle.rc_add_stats(want, extra)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]
    assert_all_close([got, *stats[0]], [want, *stats[1]], tol)
    scale, shift = torch.rand(6, dtype=stats[0][0].dtype) + 0.5, torch.randn(6, dtype=stats[0][0].dtype)
    h = cpu.rc_bn_relu(got, extra, scale, shift, extra)
    assert h.stride() == got.stride()
    assert_all_close([h], [oracle.rc_bn_relu(got, extra, scale, shift, extra)], 8e-3 if dtype == torch.bfloat16 else tol)
    dh, dfeed = torch.randn_like(got), torch.randn_like(got) if with_extras else None
    rstd, gamma = torch.rand(6, dtype=scale.dtype) + 0.5, torch.randn(6, dtype=scale.dtype)
    mine = None if dfeed is None else dfeed.clone()
    start = None if dfeed is None else dfeed.clone()
    result = cpu.rc_bn_relu_bwd(got, dh, scale, shift, stats[0][0], rstd, gamma, mine, True)
    expected = oracle.rc_bn_relu_bwd(got, dh, scale, shift, stats[0][0], rstd, gamma, dfeed, True)
    assert_all_close(list(result) + ([mine] if with_extras else []),
                      list(expected) + ([dfeed] if with_extras else []), 8e-3 if dtype == torch.bfloat16 else tol)
    # ds written over a dh the caller gives up (the op's backward does this with its own buffers)
    mine, over = start, dh.clone()
    result = cpu.rc_bn_relu_bwd(got, over, scale, shift, stats[0][0], rstd, gamma, mine, True, ds_into_dh=True)
    assert result[0].data_ptr() == over.data_ptr()
    assert_all_close(list(result) + ([mine] if with_extras else []),
                      list(expected) + ([dfeed] if with_extras else []), 8e-3 if dtype == torch.bfloat16 else tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("row, step", [(0, 0), (1, 2)], ids=["first", "later_row_and_step"])
@requires_cpp
def test_cpu_step_stats_match_add_stats_and_the_affine(dtype, row, step, cpu):
    out = (randn_input(2, 6, 7, 9, channels_last=True) * 3 + 2).to(dtype)
    feed = randn_input(2, 6, 7, 9, channels_last=True).to(dtype)
    gamma, beta = torch.randn(3, 6, dtype=dtype), torch.randn(3, 6, dtype=dtype)
    stats = torch.full((5, 3, 6), float("nan"), dtype=dtype)
    got = out.clone()
    cpu.rc_add_stats_affine(got, feed, gamma, beta, row, 1e-5, stats, step)
    want = out.clone()
    mean, var = cpu.rc_add_stats(want, feed)
    expected = torch.stack([mean, var, *steps.affine(gamma[row], beta[row], mean, var, 1e-5)[:2],
                            torch.rsqrt(var + 1e-5)])
    assert torch.equal(got, want)
    torch.testing.assert_close(stats[:, step], expected, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=0)
    others = [k for k in range(3) if k != step]
    assert stats[:, others].isnan().all()  # only its own step is written


@requires_cpp
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpu_relu_backward_stops_at_an_exactly_zero_pre_activation(layout, cpu):
    # torch.relu's backward (threshold_backward) passes no gradient where its input is exactly 0;
    # random data never hits 0, so a third of s is zero here, with shift 0.
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(2, 5, 7, 9, generator=gen)
    s[torch.rand(s.shape, generator=gen) < 0.33] = 0.0
    if layout == "channels_last":
        s = s.contiguous(memory_format=torch.channels_last)
    dh = torch.randn(s.shape, generator=gen).contiguous(memory_format=torch.channels_last if layout ==
                                                        "channels_last" else torch.contiguous_format)
    scale, shift = torch.rand(5, generator=gen) + 0.5, torch.zeros(5)
    mean, rstd, gamma = torch.randn(5, generator=gen), torch.rand(5, generator=gen) + 0.5, torch.randn(5, generator=gen)
    got = cpu.rc_bn_relu_bwd(s, dh, scale, shift, mean, rstd, gamma, None, True)
    want = oracle.rc_bn_relu_bwd(s, dh, scale, shift, mean, rstd, gamma, None, True)
    assert_all_close(list(got), list(want), 1e-5)


@requires_cpp
def test_cpu_statistics_do_not_cancel_at_a_large_mean(cpu):
    s = (torch.randn(4, 3, 33, 35, dtype=torch.float64) + 1e4).float()  # std 1 around 1e4
    mean, var = cpu.rc_add_stats(s.clone(), None)
    want_mean, want_var = oracle.rc_add_stats(s.clone(), None)
    torch.testing.assert_close(var.double(), want_var.double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(mean.double(), want_mean.double(), rtol=1e-7, atol=0)


@requires_cpp
@pytest.mark.parametrize("case, message", [("dtype", "of the statistics' dtype"), ("count", "one running mean"),
                                           ("tracked", "one int64 CPU value")])
def test_cpu_running_stats_update_refuses_mismatched_buffers(case, message):
    from r2unet_fast.ops import cpu as launchers

    stats = torch.rand(5, 3, 4)
    means, variances = [torch.zeros(4) for _ in range(3)], [torch.ones(4) for _ in range(3)]
    tracked = [torch.tensor(0) for _ in range(3)]
    if case == "dtype":
        means[1] = means[1].double()
    elif case == "count":
        variances = variances[:2]
    else:
        tracked[2] = torch.tensor(0.0)
    before = [m.clone() for m in means]
    with pytest.raises(RuntimeError, match=message):
        launchers.rc_update_running_stats(stats, means, variances, tracked, 0.1, 10)
    assert all(torch.equal(a, b) for a, b in zip(means, before))  # checked before anything is written
