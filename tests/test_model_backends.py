"""The whole model: every available backend gives the reference's logits, loss, gradients and loss curve."""
import copy
import warnings

import pytest
import torch

from backend_cases import Case, cases

from r2unet_fast import HybridLoss, R2AttUNet


def _switched(model: R2AttUNet, backend: str) -> R2AttUNet:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ops without a kernel for this backend run the reference
        return model.set_backend(backend)


def _model() -> R2AttUNet:
    return R2AttUNet(base_channels=4, depth=3, t=2, attention_norm=True).double()


def _batch(device: torch.device):
    x = torch.randn(3, 3, 16, 24, dtype=torch.float64)
    y = (torch.rand(3, 1, 16, 24) > 0.7).double()
    return x.to(device), y.to(device)


@pytest.mark.parametrize("backend", cases())
@pytest.mark.parametrize("train", [True, False])
def test_same_logits_loss_and_gradients(backend: Case, train):
    ref = _model().to(backend.device).train(train)
    fast = _switched(copy.deepcopy(ref), backend.name)
    x, y = _batch(backend.device)
    losses, grads = [], []
    for model, name in ((ref, "reference"), (fast, backend.name)):
        logits = model(x)
        loss = HybridLoss(pos_weight=2.5, backend=name)(logits, y)
        loss.backward()
        losses.append((logits.detach(), loss.detach()))
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses[1][1], losses[0][1], rtol=1e-10, atol=1e-12)
    for g_fast, g_ref in zip(*grads):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-8, atol=1e-10)


@pytest.fixture
def exact_cuda_convolutions():
    """On CUDA, deterministic fp32 convolutions (no TF32, no atomics in cuDNN's backward), so two
    runs differ only by what the loss backend changes; restored afterwards."""
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = flags


# Not through the Triton interpreter: there every recurrent unit and gate of the model is numpy
# (minutes per step); its model-level parity is test_same_logits_loss_and_gradients, and the
# curve runs for the C++ backend here and compiled Triton on a GPU.
CURVE_CASES = [c for c in cases() if not (c.values[0].name == "triton" and c.values[0].device.type == "cpu")]


@pytest.mark.parametrize("backend", CURVE_CASES)
def test_short_training_runs_follow_the_same_loss_curve(backend: Case, exact_cuda_convolutions):
    curves = []
    steps, batch = 6, 4
    for name in ("reference", backend.name):
        torch.manual_seed(1)
        model = _switched(R2AttUNet(base_channels=4, depth=3, t=2).to(backend.device), name)
        loss_fn = HybridLoss(backend=name)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(2)
        curve = []
        for _ in range(steps):
            x = torch.randn(batch, 3, 16, 16, generator=gen).to(backend.device)
            y = (x.mean(1, keepdim=True) > 0).float()
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(curve)
    assert curves[1] == pytest.approx(curves[0], rel=1e-3, abs=1e-4)
    assert curves[0][-1] < curves[0][0]
