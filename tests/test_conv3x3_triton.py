"""The Triton implicit-GEMM 3x3 convolution (r2unet_fast.ops.triton.conv3x3): forward with the
BatchNorm + ReLU prologue and the add + statistics epilogue, data and weight gradients, against
float64 ATen (exact in float64, the ratio rule in lower precision), at the interpreter's
default tiles and at small tiles that reach every remainder (several pixel tiles, output-channel
blocks, K blocks with the taps in K and per tap, weight-gradient splits); NaN, determinism,
bad input, and the per-shape choice."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from backend_cases import cases

BACKENDS = cases(None, ("triton",))
LOW = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4}
SMALL_WGRAD = {"BLOCK_P": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4}
# (N, C_in, C_out, H, W): odd sizes; 20 input channels take the per-tap K loop at 16-wide blocks
# (a remainder of 4), 5 the taps-in-K loop (45 rows: three blocks); 18 outputs two N blocks
SMALL_SHAPES = [(2, 5, 18, 7, 9), (1, 20, 6, 5, 11)]


def _cv():
    from r2unet_fast.ops.triton import conv3x3
    return conv3x3


@pytest.fixture(params=["default_tiles", "small_tiles"])
def tiles(request, monkeypatch):
    if request.param == "small_tiles":
        from r2unet_fast.ops.triton import tuning
        monkeypatch.setitem(_cv().CONV_TILES, tuning.INTERPRETER_ARCH, SMALL_TILES)
        monkeypatch.setitem(_cv().WGRAD_TILES, tuning.INTERPRETER_ARCH, SMALL_WGRAD)
    return request.param


def _case(n, ci, co, h, w, dtype, device, channels_last, seed=0):
    """x, w, bias, feed, grad in dtype; scale, shift in the compute dtype (shift partly positive,
    so the padding's activation relu(shift) would differ from 0)."""
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def act(c):
        return torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(device, dtype).contiguous(memory_format=fmt)
    x, feed, grad = act(ci), act(co), act(co)
    wt = (torch.randn(co, ci, 3, 3, generator=gen, dtype=torch.float64) / (3 * ci ** 0.5)).to(device, dtype)
    bias = torch.randn(co, generator=gen, dtype=torch.float64).to(device, dtype)
    scale = (1 + 0.5 * torch.randn(ci, generator=gen, dtype=torch.float64)).to(device, acc)
    shift = (0.5 + 0.5 * torch.randn(ci, generator=gen, dtype=torch.float64)).to(device, acc)
    return x, wt, bias, feed, grad, scale, shift


def _h(x, scale, shift):
    """The prologue's activation as the unfused path stores it: in x's dtype."""
    return torch.relu(x.to(scale.dtype) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)


def _truth(x, wt, bias, scale, shift, feed):
    h = _h(x, scale, shift) if scale is not None else x
    out = F.conv2d(h.double(), wt.double(), None if bias is None else bias.double(), padding=1)
    return out if feed is None else out + feed.double()


def _eager(x, wt, bias, scale, shift, feed):
    """The unfused path in x's dtype (float32 for CPU half convolutions, rounded back)."""
    h = _h(x, scale, shift) if scale is not None else x
    dt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu" else x.dtype
    out = F.conv2d(h.to(dt), wt.to(dt), None if bias is None else bias.to(dt), padding=1).to(x.dtype)
    return out if feed is None else out + feed


def _ratio_rule(name, got, truth, eager):
    """Exact in float64; else the error against float64 within 2x the eager path's (plus a last
    place of the largest value, for outputs eager happens to get exactly)."""
    scale = truth.abs().max().item()
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, truth, rtol=1e-12, atol=1e-12 * scale, msg=lambda m: f"{name}: {m}")
        return
    err = (got.double() - truth).abs().max().item()
    eager_err = (eager.double() - truth).abs().max().item()
    assert err <= 2 * eager_err + torch.finfo(got.dtype).eps * scale, (name, err, eager_err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64] + LOW, ids=str)
@pytest.mark.parametrize("path", ["plain_bias", "prologue_feed_stats"])
@LAYOUTS
def test_forward_matches_float64(backend, dtype, path, channels_last):
    x, wt, bias, feed, _, scale, shift = _case(2, 5, 6, 7, 9, dtype, backend.device, channels_last)
    args = (x, wt, bias, None, None, None) if path == "plain_bias" else (x, wt, None, scale, shift, feed)
    out, mean, var = _cv().conv3x3(*args, stats=path != "plain_bias")
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last if channels_last
                                                    else torch.contiguous_format)
    _ratio_rule("out", out, _truth(*args), _eager(*args))
    if path == "plain_bias":
        assert mean is None and var is None
        return
    stored = out.double()  # the statistics are of the stored values
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(mean.double(), stored.mean((0, 2, 3)), rtol=tol, atol=tol)
    torch.testing.assert_close(var.double(), stored.var((0, 2, 3), unbiased=False), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
@LAYOUTS
def test_every_remainder_in_float64(backend, shape, channels_last, tiles):
    x, wt, bias, feed, grad, scale, shift = _case(*shape, torch.float64, backend.device, channels_last)
    cv = _cv()
    out, mean, var = cv.conv3x3(x, wt, bias, scale, shift, feed, stats=True)
    truth = _truth(x, wt, bias, scale, shift, feed)
    torch.testing.assert_close(out, truth, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, truth.mean((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, truth.var((0, 2, 3), unbiased=False), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cv.conv3x3_dgrad(grad, wt), torch.nn.grad.conv2d_input(x.shape, wt, grad, padding=1),
                               rtol=1e-12, atol=1e-12)
    for prologue in (False, True):
        h = _h(x, scale, shift) if prologue else x
        got = cv.conv3x3_wgrad(grad, x, scale if prologue else None, shift if prologue else None)
        torch.testing.assert_close(got, torch.nn.grad.conv2d_weight(h, wt.shape, grad, padding=1),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_gradients_follow_the_ratio_rule(backend, dtype):
    x, wt, _, _, grad, scale, shift = _case(2, 5, 6, 7, 9, dtype, backend.device, True)
    cv = _cv()
    x64, w64, g64, h = x.double(), wt.double(), grad.double(), _h(x, scale, shift)
    dt = torch.float32 if dtype != torch.float32 and x.device.type == "cpu" else dtype
    eager_dx = torch.nn.grad.conv2d_input(x.shape, wt.to(dt), grad.to(dt), padding=1).to(dtype)
    _ratio_rule("dx", cv.conv3x3_dgrad(grad, wt), torch.nn.grad.conv2d_input(x64.shape, w64, g64, padding=1), eager_dx)
    eager_dw = torch.nn.grad.conv2d_weight(h.to(dt), wt.shape, grad.to(dt), padding=1).to(dtype)
    got = cv.conv3x3_wgrad(grad, x, scale, shift)
    assert got.dtype == dtype and got.shape == wt.shape
    _ratio_rule("dw", got, torch.nn.grad.conv2d_weight(h.double(), wt.shape, g64, padding=1), eager_dw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_padding_is_zero_after_the_activation(backend):
    # every interior activation is relu(-10 + 1) = 0, while relu(0 * 1 + 1) = 1: a padding of the
    # input instead of the activation would put the weights into the border outputs
    x = torch.full((1, 2, 4, 5), -10.0, dtype=torch.float64, device=backend.device)
    ones = torch.ones(2, dtype=torch.float64, device=backend.device)
    wt = torch.ones(3, 2, 3, 3, dtype=torch.float64, device=backend.device)
    out, _, _ = _cv().conv3x3(x, wt, None, ones, ones, None)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(_cv().conv3x3_wgrad(torch.ones_like(out), x, ones, ones), torch.zeros_like(wt))


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_keep_float32_accuracy_far_from_zero(backend):
    x, wt, _, feed, _, scale, shift = _case(2, 5, 6, 7, 9, torch.float32, backend.device, True)
    feed = feed + 1e4  # outputs of mean 1e4 and std about 1: a sum of squares would lose the variance
    out, mean, var = _cv().conv3x3(x, wt, None, scale, shift, feed, stats=True)
    stored = out.double()
    torch.testing.assert_close(var.double(), stored.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean.double(), stored.mean((0, 2, 3)), rtol=1e-7, atol=1e-3)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_reaches_exactly_what_it_touches(backend):
    x, wt, bias, feed, grad, scale, shift = _case(2, 5, 6, 7, 9, torch.float64, backend.device, False)
    x[1, 2, 3, 4] = float("nan")
    grad[0, 1, 0, 0] = float("nan")
    cv = _cv()
    out, mean, var = cv.conv3x3(x, wt, bias, scale, shift, feed, stats=True)
    want = _truth(x, wt, bias, scale, shift, feed)
    assert torch.equal(out.isnan(), want.isnan()) and out.isnan().sum() == 6 * 9
    assert mean.isnan().all() and var.isnan().all()
    dx = cv.conv3x3_dgrad(grad, wt)
    assert torch.equal(dx.isnan(), torch.nn.grad.conv2d_input(x.shape, wt, grad, padding=1).isnan())
    dw = cv.conv3x3_wgrad(grad, x, scale, shift)
    want_dw = torch.nn.grad.conv2d_weight(_h(x, scale, shift), wt.shape, grad, padding=1)
    assert torch.equal(dw.isnan(), want_dw.isnan()) and dw.isnan().any() and not dw.isnan().all()
    torch.testing.assert_close(out.nan_to_num(), want.nan_to_num(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_bits_every_run(backend, tiles):
    x, wt, bias, feed, grad, scale, shift = _case(2, 5, 18, 7, 9, torch.float32, backend.device, True)
    cv = _cv()
    first = (*cv.conv3x3(x, wt, bias, scale, shift, feed, stats=True), cv.conv3x3_wgrad(grad, x, scale, shift))
    again = (*cv.conv3x3(x, wt, bias, scale, shift, feed, stats=True), cv.conv3x3_wgrad(grad, x, scale, shift))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, message", [
    ("w_dtype", "w must have the activations' dtype"), ("half_prologue", "scale and shift come together"),
    ("feed_shape", "feed"), ("strided", "NCHW-contiguous or channels_last"), ("int", "x must be"),
    ("empty", "no elements"), ("scale_dtype", "scale must be"), ("w_shape", "w"),
    ("strided_shift", "shift must be contiguous"),
])
def test_bad_inputs_raise_errors_naming_the_problem(backend, case, message):
    x, wt, bias, feed, _, scale, shift = _case(2, 5, 6, 7, 9, torch.float32, backend.device, False)
    args = {"w_dtype": (x, wt.double()), "half_prologue": (x, wt, None, scale, None),
            "feed_shape": (x, wt, None, None, None, feed[:, :, :5]), "strided": (x[:, :, :, ::2], wt),
            "int": (x.to(torch.int32), wt), "empty": (x[:0], wt), "scale_dtype": (x, wt, None, scale.double(), shift),
            "w_shape": (x, wt[:, :, :2]),
            "strided_shift": (x, wt, None, scale, torch.stack([shift, shift], 1)[:, 0])}[case]
    with pytest.raises(ValueError, match=message):
        _cv().conv3x3(*args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_choice_is_the_kernel_here_unless_forced(backend):
    cv = _cv()
    x = torch.zeros(1, 2, 3, 3, device=backend.device)
    never = lambda: pytest.fail("nothing is measured off the GPU or when forced")  # noqa: E731
    if backend.device.type == "cpu":
        assert cv.choose("fwd", x, 2, 2, never) == "triton"
    with cv.forced("aten"):
        assert cv.choose("wgrad", x, 2, 2, never) == "aten"
    with pytest.raises(ValueError, match="triton, aten"):
        with cv.forced("cudnn"):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="first-use measurement needs a GPU")
def test_first_use_measures_once_and_remembers():
    cv = _cv()
    x = torch.randn(2, 8, 12, 12, device="cuda")
    wt = torch.randn(8, 8, 3, 3, device="cuda")
    calls = []

    def candidates():
        calls.append(1)
        return {"triton": lambda: cv.conv3x3(x, wt), "aten": lambda: F.conv2d(x, wt, padding=1)}
    first = cv.choose("fwd", x, 8, 8, candidates)
    assert first in cv.IMPLS and cv.choose("fwd", x, 8, 8, candidates) == first and len(calls) == 1
    assert first in cv.measured_choices().values()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_outputs_are_rounded_once_to_nearest(backend, dtype):
    # the fp32 sum differs from float64 far below a half's last place, so rounding it to nearest
    # gives the float64 truth's nearest half almost everywhere; truncation would give it half the time
    x, wt, bias, feed, _, scale, shift = _case(2, 5, 6, 7, 9, dtype, backend.device, True)
    out, _, _ = _cv().conv3x3(x, wt, bias, scale, shift, feed)
    agree = (out == _truth(x, wt, bias, scale, shift, feed).to(dtype)).double().mean().item()
    assert agree > 0.97, agree


def test_pick_takes_the_committed_then_the_remembered_then_the_faster(monkeypatch):
    cv = _cv()
    monkeypatch.setattr(cv, "_MEASURED", {})
    committed = ("sm_90", "fwd", 64, 64, 1 << 20, "bfloat16")
    monkeypatch.setitem(cv.CONV_CHOICES, committed, "triton")
    never = lambda: pytest.fail("a committed or remembered shape is not measured")  # noqa: E731
    assert cv.pick(committed, True, never) == "triton"
    other = ("sm_90", "wgrad", 64, 64, 1 << 20, "bfloat16")
    assert cv.pick(other, False, never) == "aten"  # tracing or capturing: the known path, nothing remembered
    assert cv.measured_choices() == {}
    ran = []
    sides = {"triton": lambda: ran.append("triton"), "aten": lambda: ran.append("aten")}
    fake_ms = {"triton": 2.0, "aten": 1.0}

    def time_ms(fn):
        fn()
        return fake_ms[ran[-1]]
    assert cv.pick(other, True, lambda: sides, time_ms) == "aten" and sorted(ran) == ["aten", "triton"]
    assert cv.pick(other, True, never) == "aten" and cv.measured_choices() == {other: "aten"}
    fake_ms.update(triton=0.5)
    third = ("sm_90", "dgrad", 64, 64, 1 << 20, "bfloat16")
    assert cv.pick(third, True, lambda: sides, time_ms) == "triton"
