"""ConvBNReLU, the U-Net and ResU-Net layers and the decoder's up-convolutions, on the fused
``recurrent_conv`` op at t = 0 (no recurrent weight): parity with the eager layers over training
steps (both layouts, the ResU-Net skip as the op's residual, momentum None), the op and the
reference with ``w_r=None``, the state_dict layout of old checkpoints, the fallbacks and their
reasons, and the backend report of every model configuration.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from backend_cases import cases
from unit_parity import assert_all_close, assert_bf16_ratio_rule, bf16_autocast_steps, pair, randn_input, train_steps

from r2unet_fast import ops
from r2unet_fast.nn import BLOCKS, AttentionGate, ConvBlock, ConvBNReLU, R2AttUNet, RecurrentConv, ResidualBlock
from r2unet_fast.ops.reference import recurrent_conv as reference_recurrent_conv

BACKENDS = cases("recurrent_conv")
CPU_ONLY = cases("recurrent_conv", ("cpu",))
KEYS = ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"]


def _op_events(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


@pytest.mark.parametrize("kind", ["conv", "residual"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", CPU_ONLY)
def test_blocks_match_the_eager_layers_in_training_and_eval(backend, kind, channels_last):
    block = ConvBlock(5, 6) if kind == "conv" else ResidualBlock(5, 6)
    ref, fast = pair(block, backend)
    x = randn_input(2, 5, 7, 9, device=backend.device, channels_last=channels_last)
    got, want = train_steps(fast, x), train_steps(ref, x)
    assert_all_close(got, want, 1e-9)
    assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert [int(b) for b in fast.buffers() if b.dtype == torch.int64] == [3, 3]  # num_batches_tracked
    ref.eval(), fast.eval()
    with torch.no_grad():
        assert_all_close([fast(x)], [ref(x)], 1e-10)
    # the fused op ran, and no eager BatchNorm: the layers did not fall back silently
    events = _op_events(lambda: fast.train()(x))
    assert events.count(f"r2unet_fast::recurrent_conv_train_{backend.name}") == 2
    assert not any("batch_norm" in e for e in events), [e for e in events if "batch_norm" in e]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("backend", CPU_ONLY)
def test_unit_with_a_residual_and_momentum_none_updates_statistics_as_batchnorm(backend, momentum):
    unit = ConvBNReLU(3, 4)
    unit[1].momentum = momentum
    ref, fast = pair(unit, backend)
    x = randn_input(3, 3, 6, 5, device=backend.device)
    residual = randn_input(3, 4, 6, 5, device=backend.device)
    got, want = train_steps(fast, x, residual=residual), train_steps(ref, x, residual=residual)
    assert_all_close(got, want, 1e-9)
    assert int(fast[1].num_batches_tracked) == 3


@pytest.mark.parametrize("backend", CPU_ONLY)
def test_bf16_autocast_from_a_float32_input_follows_the_ratio_rule(backend):
    # The U-Net's first layer takes the float32 image. Under autocast eager runs its convolution in bf16
    # (and its backward gets bf16 gradients); the fused op must do the same, not mix the dtypes.
    block = ConvBlock(3, 6)
    x = randn_input(2, 3, 9, 7, device=backend.device, dtype=torch.float32)
    ref, fast, exact = bf16_autocast_steps(block, backend, x)
    for i, (r, f, e) in enumerate(zip(ref, fast, exact)):
        assert (f is None) == (r is None), i
        if e is not None and e.is_floating_point():
            assert f.dtype == r.dtype, (i, f.dtype, r.dtype)
    assert_bf16_ratio_rule(ref, fast, exact)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_without_a_recurrent_weight_at_t0(backend):
    dev = backend.device
    x = randn_input(2, 3, 4, 5, device=dev).requires_grad_()
    w_f = (torch.randn(4, 3, 3, 3, dtype=torch.float64) * 0.3).to(dev).requires_grad_()
    b_f, gamma, beta = (torch.randn(4, dtype=torch.float64, device=dev).requires_grad_() for _ in range(3))
    results = []
    for name, w_r in ((backend.name, None), ("reference", None), ("reference", torch.randn(4, 4, 3, 3).double())):
        stats = [torch.zeros(4, dtype=torch.float64, device=dev), torch.ones(4, dtype=torch.float64, device=dev),
                 torch.zeros((), dtype=torch.int64, device=dev)]
        out = ops.recurrent_conv(x, w_f, b_f, None if w_r is None else w_r.to(dev), [gamma], [beta], [stats[0]],
                                 [stats[1]], [stats[2]], t=0, training=True, backend=name)
        grads = torch.autograd.grad(out.square().sum(), (x, w_f, b_f, gamma, beta))
        results.append([out, *grads, *stats])
    assert_all_close(results[0], results[1], 1e-10)
    assert_all_close(results[2], results[1], 0.0)  # w_r is unused at t = 0
    with pytest.raises(ValueError, match="w_r"):
        reference_recurrent_conv(x, w_f, b_f, None, [gamma] * 2, [beta] * 2, [stats[0]] * 2, [stats[1]] * 2,
                                 None, t=1, training=True)


def test_state_dict_layout_is_that_of_the_eager_sequential_on_every_backend():
    # ConvBlock before the fused layers: plain nn.Sequentials of (conv, norm, relu). Their checkpoints load.
    torch.manual_seed(3)
    old = torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Conv2d(i, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                                                    torch.nn.ReLU(inplace=True)) for i in (3, 4)))
    with torch.no_grad():
        for m in old.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.num_batches_tracked.fill_(7)
    x = torch.randn(2, 3, 6, 6)
    for backend in ("reference", "auto"):
        block = ConvBlock(3, 4, backend=backend)
        assert list(block[0].state_dict()) == KEYS
        assert list(block.state_dict()) == list(old.state_dict())
        block.load_state_dict(old.state_dict())  # strict
        with torch.no_grad():
            torch.testing.assert_close(block.eval()(x), old.eval()(x), rtol=1e-5, atol=1e-6)


def test_fallbacks_run_the_eager_layers_and_say_why(monkeypatch):
    from r2unet_fast.nn.sync_norm import DistributedBatchNorm2d

    unit = ConvBNReLU(3, 4, backend="auto")
    assert not unit.runs_on().startswith("reference")
    plain = ConvBNReLU(3, 4, backend="reference")
    synced = ConvBNReLU(3, 4)
    synced[1] = DistributedBatchNorm2d(4)
    frozen = ConvBNReLU(3, 4)
    frozen[1] = torch.nn.BatchNorm2d(4, affine=False)
    assert plain.runs_on() == "reference"
    assert synced.runs_on() == "reference (DistributedBatchNorm2d norm (statistics shared across processes))"
    assert frozen.runs_on() == "reference (BatchNorm without affine parameters or running statistics)"
    assert "runs_on='reference (DistributedBatchNorm2d" in repr(synced)

    def fused(*args, **kwargs):
        raise AssertionError("the fused op ran")

    monkeypatch.setattr(ops, "recurrent_conv", fused)
    x = torch.randn(2, 3, 5, 5)
    for layer in (plain, synced, frozen):
        eager = torch.nn.Sequential(*layer)  # the same modules, run by nn.Sequential
        torch.testing.assert_close(layer(x), eager(x))
    with pytest.raises(AssertionError, match="the fused op ran"):
        unit(x)


def _configurations() -> list[tuple[str, bool, bool, bool]]:
    """Every block x attention x shared_norm x tied (tied only changes the recurrent blocks)."""
    return [(block, attention, shared, tied) for block, attention, shared, tied
            in itertools.product(BLOCKS, (True, False), (False, True), (False, True))
            if not tied or block in ("recurrent", "r2")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_report_puts_every_layer_of_every_configuration_on_the_fused_backend(backend):
    # "auto" resolves to cpu for CPU tensors; Triton is asked for by name (the interpreter on a CPU machine)
    requested = "auto" if backend.name == "cpu" else backend.name
    fused_types = (ConvBNReLU, RecurrentConv, AttentionGate)
    for block, attention, shared_norm, tied in _configurations():
        model = R2AttUNet(base_channels=2, depth=3, t=2, block=block, attention=attention, tied=tied,
                          shared_norm=shared_norm, backend=requested).to(backend.device)
        fused = {name for name, m in model.named_modules() if isinstance(m, fused_types)}
        # every BatchNorm of the model belongs to a layer of the report: none is left to eager ATen
        norms = {name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
        assert all(any(n.startswith(f + ".") for f in fused) for n in norms), (block, norms - fused)
        for mode in (True, False):
            report = model.train(mode).backend_report()
            assert set(report) == fused, (block, attention)
            assert set(report.values()) == {backend.name}, (block, attention, shared_norm, tied, mode, report)
        ups = {name for name in report if name.startswith("up.")}
        assert ups == {"up.0.1", "up.1.1"}
        if block in ("conv", "residual"):
            assert sum(isinstance(model.get_submodule(n), ConvBNReLU) for n in report) == 2 * 5 + 2
