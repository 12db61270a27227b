"""The C++ 3x3 weight-gradient kernels the CPU recurrent conv's backward uses: the im2col GEMM
(``csrc/conv3x3_wgrad.cpp``; float64, and float32 on CPUs without AVX2) and the direct AVX2 kernel
(``csrc/conv3x3_wgrad_direct.cpp``; float32). Against ATen's convolution backward in float64 (odd
shapes, several tiles, bands and partial sums, every register-block remainder, the BatchNorm + ReLU
applied on load, NaN), the same bits for any thread count, their errors, and the recurrent and conv
units on them matching the reference over training steps."""
from __future__ import annotations

import contextlib

import pytest
import torch
from backend_cases import cases
from unit_parity import assert_all_close, pair, randn_input, train_steps

from r2unet_fast import ops
from r2unet_fast.nn import ConvBNReLU
from r2unet_fast.nn.blocks import RRCUBlock

CPU_ONLY = cases("recurrent_conv", ("cpu",))
_REASON = ops.available_backends("recurrent_conv", "cpu")["cpu"]
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"cpu backend: {_REASON}")


def _cpu():
    from r2unet_fast.ops import cpu

    return cpu


def _direct_reason() -> str | None:
    return None if _REASON is None and _cpu().avx2_kernels() else "this CPU has no AVX2 + FMA"


# float32 weight gradients run on the direct kernel when True, on the im2col GEMM when False
KERNELS = [pytest.param(True, id="direct", marks=pytest.mark.skipif(_direct_reason() is not None,
                                                                    reason=str(_direct_reason()))),
           pytest.param(False, id="im2col")]


def _aten_wgrad(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    w = torch.empty(grad.shape[1], h.shape[1], 3, 3, dtype=torch.float64)
    return torch.ops.aten.convolution_backward(grad.double(), h.double(), w, None, [1, 1], [1, 1], [1, 1], False,
                                               [0, 0], 1, [False, True, False])[1]


def _case(n: int, c_in: int, c_out: int, h: int, w: int, dtype: torch.dtype = torch.float64):
    x = randn_input(n, c_in, h, w, dtype=dtype, channels_last=True)
    grad = randn_input(n, c_out, h, w, dtype=dtype, channels_last=True)
    scale = (torch.rand(c_in, dtype=torch.float64) + 0.5).to(dtype)
    shift = torch.randn(c_in, dtype=torch.float64).to(dtype)
    return x, grad, scale, shift


# (2, 8, 40, 40) and (3, 8, 37, 29): more than one tile of unfolded columns (131072 values, 1820
# pixels at 8 channels), so two and more partial sums; the rest fit one tile.
SHAPES = [(2, 5, 6, 7, 9), (1, 3, 4, 1, 1), (3, 4, 4, 2, 13), (2, 8, 3, 40, 40), (3, 8, 5, 37, 29)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "bn_relu_on_load"])
def test_matches_aten_in_float64(shape, prologue):
    x, grad, scale, shift = _case(*shape)
    h = torch.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)) if prologue else x
    got = _cpu().conv3x3_wgrad(grad, x, scale if prologue else None, shift if prologue else None)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == torch.float64
    torch.testing.assert_close(got, _aten_wgrad(grad, h), rtol=1e-12, atol=1e-12)


def _ratio_rule(mine: torch.Tensor, grad: torch.Tensor, h: torch.Tensor) -> None:
    """float32 error against float64 truth within 2x that of ATen's own float32 weight gradient."""
    truth = _aten_wgrad(grad, h)
    w = torch.empty(grad.shape[1], h.shape[1], 3, 3).contiguous(memory_format=torch.channels_last)
    aten = torch.ops.aten.convolution_backward(grad, h, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                               [False, True, False])[1]
    assert mine.dtype == torch.float32 and mine.is_contiguous(memory_format=torch.channels_last)
    err, aten_err = (mine.double() - truth).abs().max(), (aten.double() - truth).abs().max()
    assert err <= 2 * aten_err + 1e-6 * truth.abs().max(), (err, aten_err)


@pytest.mark.parametrize("direct", KERNELS)
def test_float32_follows_the_ratio_rule(direct):
    x, grad, scale, shift = _case(2, 8, 6, 40, 40, torch.float32)
    h = torch.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    _ratio_rule(_cpu().conv3x3_wgrad(grad, x, scale, shift, direct=direct, winograd=False), grad, h)


# The direct kernel's blocks: the 3 taps of a kernel row by 4 output channels by 8 input channels,
# the input padded to a multiple of 8 channels, bands of rows within 192 KB. (1, 8, 3, 200, 24) has
# two bands per image; (5, 20, 13, 6, 7) five bands, so four partial sums, 4 + 4 + 4 + 1 output and
# 3 x 8 input channels; the rest cover every output remainder (1 to 3), 1 to 40 input channels and
# 1-pixel images.
DIRECT_SHAPES = [(2, 5, 6, 7, 9), (1, 3, 4, 1, 1), (3, 4, 1, 2, 13), (1, 8, 3, 200, 24), (5, 20, 13, 6, 7),
                 (2, 16, 16, 12, 12), (1, 40, 5, 5, 3), (2, 1, 2, 9, 4)]


@pytest.mark.skipif(_direct_reason() is not None, reason=str(_direct_reason()))
@pytest.mark.parametrize("shape", DIRECT_SHAPES, ids=str)
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "bn_relu_on_load"])
def test_direct_kernel_follows_the_ratio_rule(shape, prologue):
    x, grad, scale, shift = _case(*shape, dtype=torch.float32)
    h = torch.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)) if prologue else x
    _ratio_rule(_cpu().conv3x3_wgrad(grad, x, scale if prologue else None, shift if prologue else None,
                                     winograd=False), grad, h)


@pytest.mark.parametrize("dtype", [torch.float64, pytest.param(torch.float32, marks=KERNELS[0].marks)],
                         ids=["im2col_float64", "direct_float32"])
def test_nan_in_the_input_reaches_the_weights_it_touches(dtype):
    x, grad, scale, shift = _case(1, 3, 2, 5, 5, dtype)
    x[0, 1, 2, 2] = float("nan")
    h = torch.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    got = _cpu().conv3x3_wgrad(grad, x, scale, shift, winograd=False)
    want = _aten_wgrad(grad, h)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan()[:, 1].all() and not got.isnan()[:, 0].any()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double().nan_to_num(), want.nan_to_num(), rtol=tol, atol=tol)


@pytest.mark.parametrize("direct", KERNELS)
def test_same_bits_for_any_thread_count(direct):
    x, grad, scale, shift = _case(5, 20, 13, 6, 7, torch.float32) if direct else _case(3, 8, 5, 37, 29, torch.float32)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_cpu().conv3x3_wgrad(grad, x, scale, shift, direct=direct, winograd=False))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("case, message", [
    ("nchw", "channels_last"), ("dtype", "share a dtype"), ("shape", "does not match"),
    ("half_prologue", "both scale and shift"), ("scale_size", "scale and shift must be contiguous"),
])
def test_bad_inputs_raise_errors_naming_the_problem(case, message):
    x, grad, scale, shift = _case(2, 3, 4, 5, 6)
    dw = torch.empty(4, 3, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    args = {"nchw": (grad.contiguous(), x, scale, shift), "dtype": (grad, x.float(), scale, shift),
            "shape": (randn_input(2, 4, 4, 6, channels_last=True), x, scale, shift), "half_prologue": (grad, x, scale, None),
            "scale_size": (grad, x, scale[:2], shift[:2])}[case]
    with pytest.raises(RuntimeError, match=message):
        _cpu()._C.rc_conv3x3_wgrad(*args, dw, True)


# float64 runs the im2col GEMM, float32 the direct kernel where the CPU has it
UNIT_CASES = [pytest.param(torch.float64, False, id="float64"),
              pytest.param(torch.float32, False, id="float32", marks=KERNELS[0].marks),
              pytest.param(torch.float32, True, id="float32-baseline")]


@pytest.mark.parametrize("backend", CPU_ONLY)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype, baseline", UNIT_CASES)
def test_recurrent_block_on_the_kernel_matches_the_reference(backend, tied, dtype, baseline, monkeypatch):
    # the model's channel counts are at least 32 where the im2col kernel runs; these small tests lower that
    cpu = _cpu()
    monkeypatch.setattr(cpu, "CONV3X3_WGRAD_MIN_CHANNELS", 1)
    calls, kernel = [], cpu.conv3x3_wgrad
    monkeypatch.setattr(cpu, "conv3x3_wgrad", lambda *a: calls.append(a[3] is not None) or kernel(*a))
    ref, fast = pair(RRCUBlock(5, 6, 2, tied=tied), backend, dtype)
    x = randn_input(3, 5, 7, 9, device=backend.device, dtype=dtype, channels_last=True)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    with cpu.baseline_kernels() if baseline else contextlib.nullcontext():
        got = train_steps(fast, x, steps=2)
    assert_all_close(got, train_steps(ref, x, steps=2), tol)
    # per unit and step: conv_r's two weight gradients with BN + ReLU on load, conv_f's without
    assert calls.count(True) == 2 * 2 * 2 and calls.count(False) == 2 * 2


@pytest.mark.parametrize("backend", CPU_ONLY)
def test_conv_unit_on_the_kernel_matches_the_eager_layers(backend, monkeypatch):
    monkeypatch.setattr(_cpu(), "CONV3X3_WGRAD_MIN_CHANNELS", 1)
    ref, fast = pair(ConvBNReLU(5, 6), backend)
    x = randn_input(2, 5, 7, 9, device=backend.device, channels_last=True)
    assert_all_close(train_steps(fast, x, steps=2), train_steps(ref, x, steps=2), 1e-9)



def test_baseline_kernels_turn_the_avx2_versions_off_and_back_on():
    cpu = _cpu()
    had = cpu.avx2_kernels()
    grad = randn_input(1, 16, 4, 4, dtype=torch.float32, channels_last=True)
    with cpu.baseline_kernels():
        # as on a CPU without AVX2: no direct kernel, so 16 channels are below the GEMM's floor
        assert not cpu.avx2_kernels() and not cpu.conv3x3_wgrad_applies(grad, grad)
    assert cpu.avx2_kernels() == had and cpu.conv3x3_wgrad_applies(grad, grad) == had
