"""The C++ Winograd F(2x2, 3x3) kernels that run the CPU recurrent conv step's float32 forward
convolutions (``rc_conv``), input gradients (``conv3x3_dgrad``; ``csrc/conv3x3_winograd.cpp``) and
weight gradients (``conv3x3_wgrad``; ``csrc/conv3x3_winograd_wgrad.cpp``): against float64 ATen
under the ratio rule (odd shapes and partial tiles, several tile blocks and partial sums, every
register-block remainder, 8- and 16-wide blocks, the BatchNorm + ReLU prologue, bias and feed),
weights in any layout, the same bits for any thread count, NaN, errors, where they apply, and the
recurrent unit on them matching the reference over training steps."""
from __future__ import annotations

import pytest
import torch
from backend_cases import cases
from unit_parity import assert_all_close, pair, randn_input, train_steps

from r2unet_fast import ops
from r2unet_fast.nn.blocks import RRCUBlock

CPU_ONLY = cases("recurrent_conv", ("cpu",))
_REASON = ops.available_backends("recurrent_conv", "cpu")["cpu"]


def _cpu():
    from r2unet_fast.ops import cpu

    return cpu


def _avx2_reason() -> str | None:
    if _REASON is not None:
        return f"cpu backend: {_REASON}"
    return None if _cpu().avx2_kernels() else "this CPU has no AVX2 + FMA"


pytestmark = pytest.mark.skipif(_avx2_reason() is not None, reason=str(_avx2_reason()))

# (n, c_in, c_out, h, w). Blocks are multiples of 6 tiles, at least two per thread, so with two
# threads: (2, 8, 16, 7, 9) has 40 tiles in blocks of 6 (the last one 4: a 4-row remainder) and odd
# sizes (half tiles at the right and bottom); (2, 16, 16, 40, 40) 800 tiles in blocks of 126 (a
# 2-row remainder); 8 and 24 output channels take the 8-wide block (24: one 16-wide, one 8-wide);
# 1x1 and 1-row images are all padding but one pixel or row; (2, 128, 128, 12, 12) is the model's
# deepest level, blocks of 12 tiles.
SHAPES = [(2, 8, 16, 7, 9), (1, 16, 8, 1, 1), (3, 8, 24, 2, 13), (2, 16, 16, 40, 40), (1, 40, 8, 5, 3),
          (2, 8, 8, 1, 6), (2, 128, 128, 12, 12)]


def _inputs(n: int, c_in: int, c_out: int, h: int, w: int):
    gen = torch.Generator().manual_seed(n * 1000 + c_in * 10 + c_out + h + w)
    x = torch.randn(n, c_in, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, 3, 3, generator=gen, dtype=torch.float64) / (3 * c_in ** 0.5)
    bias = torch.randn(c_out, generator=gen, dtype=torch.float64)
    scale = torch.rand(c_in, generator=gen, dtype=torch.float64) + 0.5
    shift = torch.randn(c_in, generator=gen, dtype=torch.float64)
    feed = torch.randn(n, c_out, h, w, generator=gen, dtype=torch.float64)
    return x, weight, bias, scale, shift, feed


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous(memory_format=torch.channels_last)


def _eager(x, weight, bias, scale, shift, feed):
    """The same convolution in eager ATen, in the inputs' dtype."""
    h = x if scale is None else torch.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    y = torch.nn.functional.conv2d(h, weight, bias, padding=1)
    return y if feed is None else y + feed


def _assert_ratio_rule(mine: torch.Tensor, aten32: torch.Tensor, truth: torch.Tensor) -> None:
    """float32 error against float64 truth within 2x that of ATen's own float32 result."""
    assert mine.dtype == torch.float32 and mine.is_contiguous(memory_format=torch.channels_last)
    err, aten_err = (mine.double() - truth).abs().max(), (aten32.double() - truth).abs().max()
    assert err <= 2 * aten_err + 1e-6 * truth.abs().max(), (err, aten_err)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "prologue_bias_feed"])
def test_forward_follows_the_ratio_rule(shape, epilogue):
    x, weight, bias, scale, shift, feed = _inputs(*shape)
    extra = (bias, scale, shift, feed) if epilogue else (None, None, None, None)
    b, sc, sh, f = (None if t is None else (_cl(t) if t.dim() == 4 else t.float()) for t in extra)
    got, mean, var = _cpu().rc_conv(_cl(x), _cl(weight), b, sc, sh, f)
    truth = _eager(x, weight, *extra)
    _assert_ratio_rule(got, _eager(_cl(x), _cl(weight), b, sc, sh, f), truth)
    # the statistics are those of the stored s
    torch.testing.assert_close(mean, got.double().mean((0, 2, 3)).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, got.double().var((0, 2, 3), unbiased=False).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_input_gradient_follows_the_ratio_rule(shape):
    n, c_in, c_out, h, w = shape
    x, weight, *_ = _inputs(*shape)
    grad = torch.randn(n, c_out, h, w, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def aten(g: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.convolution_backward(g, torch.empty(n, c_in, h, w, dtype=g.dtype), wt, None, [1, 1],
                                                   [1, 1], [1, 1], False, [0, 0], 1, [True, False, False])[0]

    cpu = _cpu()
    assert cpu.conv3x3_dgrad_applies(_cl(grad), _cl(weight))
    _assert_ratio_rule(cpu.conv3x3_dgrad(_cl(grad), _cl(weight)), aten(_cl(grad), _cl(weight)), aten(grad, weight))


def _aten_wgrad(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    w = torch.empty(grad.shape[1], h.shape[1], 3, 3, dtype=grad.dtype)
    return torch.ops.aten.convolution_backward(grad, h, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                               [False, True, False])[1]


# the weight gradient's tiles: blocks of at least one tile, at least 4 blocks where there are 4
# tiles (so up to 4 partial sums); (2, 16, 16, 40, 40): 800 tiles in blocks of 128, 4 partials;
# (2, 128, 128, 12, 12): blocks of 16, partials of 1 MB each; (1, 40, 8, 5, 3): 40 input channels
# in two 16-wide blocks and an 8-wide one, 8 outputs in a 6-row and a 2-row block
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "bn_relu_on_load"])
def test_weight_gradient_follows_the_ratio_rule(shape, prologue):
    n, c_in, c_out, h, w = shape
    x, _, _, scale, shift, _ = _inputs(*shape)
    grad = torch.randn(n, c_out, h, w, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    act = torch.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)) if prologue else x
    sc, sh = (scale.float(), shift.float()) if prologue else (None, None)
    got = _cpu().conv3x3_wgrad(_cl(grad), _cl(x), sc, sh)
    act32 = _cl(x) if not prologue else torch.relu(_cl(x) * sc.view(1, -1, 1, 1) + sh.view(1, -1, 1, 1))
    _assert_ratio_rule(got, _aten_wgrad(_cl(grad), act32), _aten_wgrad(grad, act))


def test_weight_gradient_has_the_same_bits_for_any_thread_count():
    x, _, _, scale, shift, _ = _inputs(2, 16, 16, 40, 40)
    grad = _cl(torch.randn(2, 16, 40, 40))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_cpu().conv3x3_wgrad(grad, _cl(x), scale.float(), shift.float()))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_nan_in_the_input_reaches_the_weights_of_its_channel_only():
    x, _, _, scale, shift, _ = _inputs(1, 8, 8, 6, 6)
    x[0, 1, 2, 2] = float("nan")
    got = _cpu().conv3x3_wgrad(_cl(torch.randn(1, 8, 6, 6)), _cl(x), scale.float(), shift.float())
    assert got.isnan()[:, 1].all() and not got.isnan()[:, [0, *range(2, 8)]].any()


def test_weights_in_any_layout_give_the_same_bits():
    x, weight, *_ = _inputs(2, 16, 24, 9, 10)
    wide = torch.randn(24, 32, 3, 3)
    wide[:, ::2] = weight.float()
    layouts = [weight.float().contiguous(), _cl(weight), wide[:, ::2]]
    cpu = _cpu()
    outs = [cpu.rc_conv(_cl(x), w, None, None, None, None, stats=False)[0] for w in layouts]
    grad = _cl(torch.randn(2, 24, 9, 10))
    grads = [cpu.conv3x3_dgrad(grad, w) for w in layouts]
    assert all(torch.equal(outs[0], o) for o in outs[1:]) and all(torch.equal(grads[0], g) for g in grads[1:])


def test_same_bits_for_any_thread_count_and_after_other_shapes():
    big, small = _inputs(2, 16, 16, 40, 40), _inputs(1, 8, 8, 3, 5)
    cpu = _cpu()

    def run(case):
        x, weight, bias, scale, shift, feed = case
        return cpu.rc_conv(_cl(x), _cl(weight), bias.float(), scale.float(), shift.float(), _cl(feed), stats=False)[0]

    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run(big))
        torch.set_num_threads(threads)
        first_small = run(small)
        # each thread's scratch buffers only grow: a small call after a big one, then big again
        assert torch.equal(run(small), first_small) and torch.equal(run(big), results[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_nan_reaches_every_output_it_touches_and_no_tile_it_does_not():
    x, weight, *_ = _inputs(1, 8, 8, 12, 12)
    x[0, 3, 5, 6] = float("nan")
    got = _cpu().rc_conv(_cl(x), _cl(weight), None, None, None, None, stats=False)[0]
    direct = _eager(x, weight, None, None, None, None)
    # every output the direct convolution makes NaN is NaN here too ...
    assert got.isnan()[direct.isnan()].all()
    # ... and beyond those, only outputs of 2x2 tiles whose 4x4 input patch holds the NaN pixel
    # (rows and columns 4..7 here: tiles 2 and 3 of 6, each direction), finite and right elsewhere
    patch = torch.zeros(12, 12, dtype=torch.bool)
    patch[4:8, 4:8] = True
    assert not got.isnan()[:, :, ~patch].any()
    torch.testing.assert_close(got.double()[:, :, ~patch], direct[:, :, ~patch], rtol=1e-5, atol=1e-5)


def _conv_call(case: str):
    x, w = _cl(torch.randn(2, 8, 5, 6)), _cl(torch.randn(16, 8, 3, 3))
    y = torch.empty(2, 16, 5, 6).contiguous(memory_format=torch.channels_last)
    vec = torch.ones(8)
    return {
        "nchw": (x.contiguous(), w, None, None, None, None, y, False),
        "dtype": (x.double().contiguous(memory_format=torch.channels_last), w, None, None, None, None, y, False),
        "w_channels": (x, _cl(torch.randn(16, 4, 3, 3)), None, None, None, None, y, False),
        "kernel": (x, torch.randn(16, 8, 5, 5), None, None, None, None, y, False),
        "y_shape": (x, w, None, None, None, None, _cl(torch.empty(2, 8, 5, 6)), False),
        "multiple": (_cl(torch.randn(2, 12, 5, 6)), _cl(torch.randn(16, 12, 3, 3)), None, None, None, None, y, False),
        "half_prologue": (x, w, None, vec, None, None, y, False),
        "scale_size": (x, w, None, vec[:4], vec[:4], None, y, False),
        "feed_shape": (x, w, None, None, None, y[:1], y, False),
        "flip_channels": (x, w, None, None, None, None, y, True),
    }[case]


@pytest.mark.parametrize("case, message", [
    ("nchw", "channels_last float32"), ("dtype", "channels_last float32"), ("w_channels", "does not take x's 8"),
    ("kernel", r"\(C_out, C_in, 3, 3\)"), ("y_shape", r"y must be \(2, 16, 5, 6\)"), ("multiple", "multiples of 8"),
    ("half_prologue", "both scale and shift"), ("scale_size", r"scale must be a contiguous float32 \(8,\)"),
    ("feed_shape", "feed must be y's shape"), ("flip_channels", "input gradient's w is the forward's"),
])
def test_bad_inputs_raise_errors_naming_the_problem(case, message):
    with pytest.raises(RuntimeError, match=message):
        _cpu()._C.rc_conv3x3_winograd(*_conv_call(case))


def test_applies_to_float32_channels_last_multiples_of_8_on_avx2_only():
    cpu = _cpu()
    # the weight gradient: Winograd where both channel counts are multiples of 8, else the direct kernel
    g, h = _cl(torch.randn(1, 16, 6, 6)), _cl(torch.randn(1, 8, 6, 6))
    winograd, direct = cpu.conv3x3_wgrad(g, h, None, None), cpu.conv3x3_wgrad(g, h, None, None, winograd=False)
    assert not torch.equal(winograd, direct)  # the same values, rounded differently
    torch.testing.assert_close(winograd, direct, rtol=1e-4, atol=1e-4)
    h12 = _cl(torch.randn(1, 12, 6, 6))
    assert torch.equal(cpu.conv3x3_wgrad(g, h12, None, None), cpu.conv3x3_wgrad(g, h12, None, None, winograd=False))
    x, w = _cl(torch.randn(1, 8, 4, 4)), _cl(torch.randn(16, 8, 3, 3))
    assert cpu.rc_conv_applies(x, w, None, None, None, None) and cpu.conv3x3_dgrad_applies(_cl(torch.randn(1, 16, 4, 4)), w)
    assert not cpu.rc_conv_applies(x.double(), w.double(), None, None, None, None)
    assert not cpu.rc_conv_applies(x.contiguous(), w, None, None, None, None)
    assert not cpu.rc_conv_applies(_cl(torch.randn(1, 12, 4, 4)), _cl(torch.randn(16, 12, 3, 3)), None, None, None, None)
    assert not cpu.conv3x3_dgrad_applies(_cl(torch.randn(1, 16, 4, 4)), _cl(torch.randn(16, 4, 3, 3)))
    with cpu.baseline_kernels():
        assert not cpu.rc_conv_applies(x, w, None, None, None, None)
        assert not cpu.conv3x3_dgrad_applies(_cl(torch.randn(1, 16, 4, 4)), w)


@pytest.mark.parametrize("backend", CPU_ONLY)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_recurrent_block_on_the_kernel_matches_the_reference(backend, tied, monkeypatch):
    cpu = _cpu()
    calls = {"rc_conv": 0, "conv3x3_dgrad": 0, "conv3x3_wgrad": 0}
    for name in calls:
        kernel = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _k=kernel, _n=name, **kw: calls.__setitem__(_n, calls[_n] + 1)
                            or _k(*a, **kw))
    ref, fast = pair(RRCUBlock(8, 16, 2, tied=tied), backend, torch.float32)
    x = randn_input(2, 8, 9, 11, device=backend.device, dtype=torch.float32, channels_last=True)
    assert_all_close(train_steps(fast, x, steps=2), train_steps(ref, x, steps=2), 1e-4)
    # per training step and unit: conv_f and conv_r twice forward; conv_r's two input and weight
    # gradients and conv_f's (the block's input needs one)
    assert calls == {"rc_conv": 2 * 2 * 3, "conv3x3_dgrad": 2 * 2 * 3, "conv3x3_wgrad": 2 * 2 * 3}
    with torch.no_grad():
        assert_all_close([fast.eval()(x)], [ref.eval()(x)], 1e-4)
    assert calls["rc_conv"] == 2 * 2 * 3 + 2 * 3


@pytest.mark.parametrize("backend", CPU_ONLY)
@pytest.mark.parametrize("batch", [3, 5], ids=["3_images", "5_images"])
def test_input_gradient_by_image_groups_matches_the_reference(backend, batch, monkeypatch):
    # large activations take conv_r's input gradient a group of images at a time, written over ds_k
    # group by group, so no second activation-sized buffer lives beside it
    from r2unet_fast.ops.library import recurrent_conv_steps as steps

    monkeypatch.setattr(steps, "RECOMPUTE_BYTES", 1)
    cpu = _cpu()
    batches, kernel = [], cpu.conv3x3_dgrad
    monkeypatch.setattr(cpu, "conv3x3_dgrad", lambda g, w: batches.append(g.shape[0]) or kernel(g, w))
    ref, fast = pair(RRCUBlock(8, 8, 2), backend, torch.float32)
    x = randn_input(batch, 8, 6, 7, device=backend.device, dtype=torch.float32, channels_last=True)
    assert_all_close(train_steps(fast, x, steps=1), train_steps(ref, x, steps=1), 1e-4)
    groups = min(batch, steps.RECOMPUTE_GROUPS)
    # per unit: conv_r's step-2 gradient whole (ds_2 is also dF, kept), step 1's by groups, conv_f's whole
    assert sorted(batches) == sorted(2 * ([batch, batch] + [len(range(batch * i // groups, batch * (i + 1) // groups))
                                                           for i in range(groups)]))
