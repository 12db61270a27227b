"""The reference ops: float64 gradients, agreement with PyTorch's own losses, stability, input checks."""
import pytest
import torch
import torch.nn.functional as F
from loss_oracle import hand_hybrid_loss
from torch.autograd import gradcheck

from r2unet_fast import ops
from r2unet_fast.ops import reference

LOSS_OPTIONS = [
    dict(),
    dict(dice_weight=1.0, bce_weight=0.0),
    dict(dice_weight=0.0, bce_weight=1.0, pos_weight=3.5),
    dict(dice_weight=0.3, bce_weight=0.7, pos_weight=0.4, smooth=0.1, per_image=False),
    dict(smooth=0.0, per_image=True),
]


@pytest.mark.parametrize("options", LOSS_OPTIONS)
def test_hybrid_loss_matches_bce_with_logits_and_hand_dice(options):
    logits = torch.randn(3, 1, 9, 7, dtype=torch.float64) * 3
    target = (torch.rand_like(logits) > 0.6).double()
    got = ops.hybrid_loss(logits, target, backend="reference", **options)
    assert got.dtype == torch.float64 and got.dim() == 0
    torch.testing.assert_close(got, hand_hybrid_loss(logits, target, **options), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", LOSS_OPTIONS)
def test_hybrid_loss_gradcheck_float64(options):
    logits = torch.randn(2, 1, 5, 3, dtype=torch.float64, requires_grad=True)
    target = torch.rand(2, 1, 5, 3, dtype=torch.float64, requires_grad=True)  # soft targets
    assert gradcheck(lambda x, t: ops.hybrid_loss(x, t, backend="reference", **options), (logits, target))


def test_hybrid_loss_is_stable_at_extreme_logits():
    logits = torch.tensor([80.0, -80.0, 80.0, -80.0], dtype=torch.float32).reshape(1, 1, 2, 2).requires_grad_()
    target = torch.tensor([0.0, 1.0, 1.0, 0.0]).reshape(1, 1, 2, 2)
    loss = ops.hybrid_loss(logits, target, dice_weight=0.0, bce_weight=1.0, backend="reference")
    loss.backward()
    # two pixels wrong by 80 nats each, two right: mean BCE = 40
    torch.testing.assert_close(loss, torch.tensor(40.0))
    assert torch.isfinite(logits.grad).all()
    torch.testing.assert_close(logits.grad.flatten(), torch.tensor([0.25, -0.25, 0.0, 0.0]))


def test_hybrid_loss_half_inputs_compute_in_float32():
    logits = torch.randn(2, 1, 8, 8).bfloat16()
    target = (torch.rand(2, 1, 8, 8) > 0.5).bfloat16()
    got = ops.hybrid_loss(logits, target, backend="reference")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ops.hybrid_loss(logits.float(), target.float(), backend="reference"))


def test_hybrid_loss_layout_does_not_matter():
    logits = torch.randn(4, 1, 10, 12, dtype=torch.float64)
    target = torch.rand_like(logits)
    expected = ops.hybrid_loss(logits, target, backend="reference")
    cl = ops.hybrid_loss(logits.to(memory_format=torch.channels_last), target, backend="reference")
    wide = torch.randn(4, 1, 10, 24, dtype=torch.float64)
    wide[..., ::2] = logits
    strided = ops.hybrid_loss(wide[..., ::2], target, backend="reference")
    torch.testing.assert_close(cl, expected)
    torch.testing.assert_close(strided, expected)


@pytest.mark.parametrize("make, message", [
    (lambda: (torch.randn(2, 1, 4, 4), torch.rand(2, 1, 4, 5)), "target must have shape"),
    (lambda: (torch.randn(2, 1, 4, 4), torch.ones(2, 1, 4, 4, dtype=torch.long)), "floating-point"),
    (lambda: (torch.randint(0, 2, (2, 1, 4, 4)), torch.rand(2, 1, 4, 4)), "floating-point"),
    (lambda: (torch.randn(0, 1, 4, 4), torch.rand(0, 1, 4, 4)), "non-empty batch"),
    (lambda: (torch.randn(4), torch.rand(4)), "(N, 1, H, W)"),
])
def test_hybrid_loss_rejects_bad_input(make, message):
    logits, target = make()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ops.hybrid_loss(logits, target)


@pytest.mark.parametrize("option", ["pos_weight", "smooth", "dice_weight", "bce_weight"])
def test_hybrid_loss_rejects_bad_weights(option):
    x = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match=option):
        ops.hybrid_loss(x, x.sigmoid(), **{option: -1.0})
    with pytest.raises(ValueError, match=option):
        ops.hybrid_loss(x, x.sigmoid(), **{option: float("nan")})


def _gate_args(n=2, cx=5, cg=3, f=4, h=5, w=3, dtype=torch.float64, requires_grad=False):
    shapes = [(n, cx, h, w), (n, cg, h, w), (f, cx), (f, cg), (f,), (f,), (1,)]
    return [torch.randn(s, dtype=dtype, requires_grad=requires_grad) for s in shapes]


def test_attention_gate_matches_formula():
    x, g, w_x, w_g, b, w_psi, b_psi = _gate_args()
    out, psi = ops.attention_gate(x, g, w_x, w_g, b, w_psi, b_psi, return_psi=True, backend="reference")
    a = torch.einsum("fc,nchw->nfhw", w_x, x) + torch.einsum("fc,nchw->nfhw", w_g, g) + b[:, None, None]
    q = torch.einsum("f,nfhw->nhw", w_psi, torch.relu(a))[:, None] + b_psi
    torch.testing.assert_close(psi, torch.sigmoid(q))
    torch.testing.assert_close(out, x * torch.sigmoid(q))
    assert psi.shape == (2, 1, 5, 3)


def test_attention_gate_gradcheck_float64():
    args = _gate_args(requires_grad=True)
    assert gradcheck(lambda *a: ops.attention_gate(*a, return_psi=True, backend="reference"), args)


@pytest.mark.parametrize("index, bad, message", [
    (1, torch.randn(2, 3, 4, 3, dtype=torch.float64), "g must match x"),
    (2, torch.randn(4, 6, dtype=torch.float64), "w_x must have shape"),
    (3, torch.randn(4, 2, dtype=torch.float64), "w_g must have shape"),
    (4, torch.randn(3, dtype=torch.float64), "bias must have shape"),
    (5, torch.randn(4, 1, dtype=torch.float64), "w_psi must have shape"),
    (6, torch.randn(2, dtype=torch.float64), "b_psi must have shape"),
    (0, torch.randn(2, 5, 5, dtype=torch.float64), "x must be 4-D"),
    (0, torch.ones(2, 5, 5, 3, dtype=torch.int32), "floating-point"),
])
def test_attention_gate_rejects_bad_input(index, bad, message):
    args = _gate_args()
    args[index] = bad
    with pytest.raises(ValueError, match=message):
        ops.attention_gate(*args)


def test_softplus_neg_is_minus_log_sigmoid_everywhere():
    x = torch.linspace(-100, 100, 2001, dtype=torch.float64)
    torch.testing.assert_close(reference.softplus_neg(x), -F.logsigmoid(x))


def test_gradient_at_exactly_zero_logits_matches_bce_with_logits():
    logits = torch.zeros(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    target = (torch.rand(2, 1, 3, 3) > 0.5).double()
    ops.hybrid_loss(logits, target, dice_weight=0.0, bce_weight=1.0, pos_weight=2.0, backend="reference").backward()
    expected = torch.zeros_like(logits, requires_grad=True)
    F.binary_cross_entropy_with_logits(expected, target, pos_weight=torch.tensor(2.0, dtype=torch.float64)).backward()
    torch.testing.assert_close(logits.grad, expected.grad)
