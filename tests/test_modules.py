"""Reference modules: the recurrence as specified, gradients, the gate's BN folding, the four models."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from r2unet_fast import AttentionGate, R2AttUNet, R2UNet, RecurrentConv, RRCUBlock
from r2unet_fast.nn import BLOCKS

POPULAR = dict(tied=True, shared_norm=True, attention_norm=True, base_channels=64, depth=5, t=2)


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _randomise_bn(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("block, attention, expected", [
    ("conv", False, 34_527_041), ("conv", True, 34_878_573), ("r2", False, 39_091_393), ("r2", True, 39_442_925),
])
def test_parameter_counts_match_the_popular_implementation(block, attention, expected):
    assert _n_params(R2AttUNet(block=block, attention=attention, **POPULAR)) == expected


def _manual_recurrence(rc: RecurrentConv, x: torch.Tensor, w_r: torch.Tensor) -> torch.Tensor:
    f = F.conv2d(x, rc.conv_f.weight, rc.conv_f.bias, padding=1)
    norm = lambda k: rc.norms[min(k, len(rc.norms) - 1)]  # noqa: E731
    h = torch.relu(norm(0)(f))
    for k in range(1, rc.t + 1):
        h = torch.relu(norm(k)(f + F.conv2d(h, w_r, padding=1)))
    return h


@pytest.mark.parametrize("t", [0, 1, 2, 3])
def test_recurrent_conv_untied_follows_the_recurrence(t):
    rc = RecurrentConv(3, 5, t=t).double().eval()
    _randomise_bn(rc)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    assert len(rc.norms) == t + 1 and rc.conv_r.bias is None
    torch.testing.assert_close(rc(x), _manual_recurrence(rc, x, rc.conv_r.weight))


def test_recurrent_conv_tied_is_conv_f_of_x_plus_h():
    rc = RecurrentConv(4, 4, t=2, tied=True, shared_norm=True).double().eval()
    _randomise_bn(rc)
    assert not hasattr(rc, "conv_r") and len(rc.norms) == 1
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    bn = rc.norms[0]
    h = torch.relu(bn(rc.conv_f(x)))
    for _ in range(2):
        h = torch.relu(bn(rc.conv_f(x + h)))  # the popular formulation, literally
    torch.testing.assert_close(rc(x), h)


def test_recurrent_conv_tied_needs_equal_channels():
    with pytest.raises(ValueError, match="in_ch == out_ch"):
        RecurrentConv(3, 4, tied=True)


@pytest.mark.parametrize("tied", [False, True])
def test_recurrent_conv_gradcheck_float64(tied):
    rc = RecurrentConv(2, 2, t=2, tied=tied).double()
    x = torch.randn(2, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    params = tuple(rc.parameters())
    # train-mode BN (batch statistics) is part of the function being checked
    assert gradcheck(lambda inp, *_: rc(inp), (x, *params), nondet_tol=0.0)


@pytest.mark.parametrize("norm", [False, True])
def test_attention_gate_gradcheck_float64(norm):
    gate = AttentionGate(3, 2, 4, norm=norm).double()
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, b: gate(a, b), (x, g))


def test_attention_gate_eval_folds_batchnorm_exactly():
    gate = AttentionGate(6, 5, 3, norm=True).double().eval()
    _randomise_bn(gate)
    x, g = torch.randn(2, 6, 5, 7, dtype=torch.float64), torch.randn(2, 5, 5, 7, dtype=torch.float64)
    eager = torch.sigmoid(gate.psi(torch.relu(gate.w_x(x) + gate.w_g(g))))
    out, psi = gate(x, g, return_psi=True)
    torch.testing.assert_close(psi, eager)
    torch.testing.assert_close(out, x * eager)


def test_attention_gate_default_has_no_bias_on_w_x():
    gate = AttentionGate(8, 6, 4)
    assert gate.w_x.bias is None and gate.w_g.bias is not None and gate.psi.bias is not None
    assert _n_params(gate) == 8 * 4 + 6 * 4 + 4 + 4 + 1


@pytest.mark.parametrize("residual", [True, False])
def test_rrcu_block_residual(residual):
    block = RRCUBlock(3, 4, t=1, residual=residual).double().eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    x0 = block.conv1x1(x)
    y = block.rc2(block.rc1(x0))
    torch.testing.assert_close(block(x), x0 + y if residual else y)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("attention", [True, False])
def test_every_model_runs_forward_and_backward(block, attention):
    model = R2AttUNet(in_channels=3, out_channels=1, base_channels=4, depth=3, t=2, block=block, attention=attention)
    x = torch.randn(2, 3, 12, 20)
    logits, maps = model(x, return_attention=True)
    assert logits.shape == (2, 1, 12, 20)
    assert len(maps) == (2 if attention else 0)
    if attention:
        assert [m.shape[-2:] for m in maps] == [(6, 10), (12, 20)]
        assert all(((m > 0) & (m < 1)).all() for m in maps)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_channels_last_gives_the_same_logits():
    model = R2AttUNet(base_channels=4, depth=3).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), model(x), rtol=1e-4, atol=1e-5)


def test_r2unet_has_no_gates_and_equals_r2attunet_without_attention():
    assert R2UNet(base_channels=4, depth=3).gates is None
    assert _n_params(R2UNet(**{k: v for k, v in POPULAR.items() if k != "attention_norm"})) == 39_091_393


@pytest.mark.parametrize("size, message", [
    ((1, 3, 30, 32), "height 30 is not divisible by 8 .*nearest valid size is 32"),
    ((1, 3, 32, 13), "width 13 is not divisible by 8 .*nearest valid size is 16"),
    ((1, 3, 5, 8), "height 5 is not divisible by 8 .*nearest valid size is 8"),
    ((1, 1, 32, 32), "1 channels, the model expects 3"),
    ((3, 32, 32), "4-D tensor"),
])
def test_model_rejects_bad_input_size(size, message):
    with pytest.raises(ValueError, match=message):
        R2AttUNet(base_channels=2, depth=4)(torch.randn(size))


@pytest.mark.parametrize("kwargs, message", [
    (dict(block="dense"), "unknown block 'dense'"),
    (dict(depth=1), "depth must be an integer >= 2"),
    (dict(base_channels=0), "base_channels"),
    (dict(backend="cuda"), "unknown backend 'cuda'"),
])
def test_model_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        R2AttUNet(**kwargs)


def test_set_backend_switches_every_submodule_and_returns_the_model():
    model = R2AttUNet(base_channels=2, depth=3)
    assert model.set_backend("reference") is model
    backends = {m.backend for m in model.modules() if hasattr(m, "backend")}
    assert backends == {"reference"}
    with pytest.raises(ValueError, match="unknown backend"):
        model.set_backend("fast")


def test_reference_backend_matches_auto_backend():
    model = R2AttUNet(base_channels=4, depth=3).eval()
    x = torch.randn(1, 3, 16, 16)
    auto = model(x)
    torch.testing.assert_close(model.set_backend("reference")(x), auto, rtol=1e-4, atol=1e-5)


def test_set_backend_names_ops_without_a_kernel_and_runs_them_on_the_reference(monkeypatch):
    from r2unet_fast.ops import dispatch

    monkeypatch.setattr(dispatch, "_cpu_import_reason", lambda: None)
    monkeypatch.setitem(dispatch._KERNELS, "attention_gate", {"reference": dispatch._KERNELS["attention_gate"]["reference"]})
    model = R2AttUNet(base_channels=2, depth=3)
    with pytest.warns(UserWarning, match="no cpu kernel for attention_gate: those layers run the reference"):
        model.set_backend("cpu")
    report = model.backend_report()
    assert {k: v for k, v in report.items() if k.startswith("gates")} == {"gates.0": "reference", "gates.1": "reference"}
    assert {v for k, v in report.items() if not k.startswith("gates")} == {"cpu"}  # the recurrent units
    assert {m.backend for m in model.modules() if isinstance(m, RecurrentConv)} == {"cpu"}
