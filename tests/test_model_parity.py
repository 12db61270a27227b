"""The whole fast model against the reference model: every block with attention, in float64 on the
C++ backend, over Adam steps (logits, loss, every gradient, every parameter and buffer), state_dicts
that move between backends, the float32 ratio rule, one tiny case through Triton, and
``torch.compile(fullgraph=True)`` of the fast model in training mode.
"""
from __future__ import annotations

import copy
import os
import shutil
import warnings

import pytest
import torch
from backend_cases import Case, cases
from unit_parity import assert_all_close

from r2unet_fast import HybridLoss, R2AttUNet
from r2unet_fast.nn import BLOCKS, ConvBNReLU, RecurrentConv

CPU_ONLY = cases(None, ("cpu",))
TRITON = cases(None, ("triton",))
needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")),
    reason="torch.compile on CPU needs a C++ compiler")


def _models(block: str, backend: Case, dtype: torch.dtype = torch.float64, **kwargs) -> tuple[R2AttUNet, R2AttUNet]:
    """(reference model, its copy on ``backend``), same weights, on ``backend.device`` in ``dtype``."""
    options = dict(base_channels=4, depth=3, t=2, block=block, attention=True) | kwargs
    ref = R2AttUNet(**options, backend="reference").to(backend.device, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every fused op has a kernel on this backend: no layer falls back
        fast = copy.deepcopy(ref).set_backend(backend.name)
    assert set(fast.backend_report().values()) == {backend.name}
    return ref, fast


def _batches(steps: int, shape: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype) -> list:
    gen = torch.Generator().manual_seed(2)
    out = []
    for _ in range(steps):
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        y = (x.mean(1, keepdim=True) + 0.3 * torch.randn(x[:, :1].shape, generator=gen, dtype=torch.float64) > 0.2)
        out.append((x.to(device, dtype), y.to(device, dtype)))
    return out


def _biases_before_batchnorm(model: torch.nn.Module) -> list[torch.Tensor]:
    """The conv biases a training-mode BatchNorm cancels: their exact gradient is 0."""
    return [m[0].bias if isinstance(m, ConvBNReLU) else m.conv_f.bias for m in model.modules()
            if isinstance(m, (ConvBNReLU, RecurrentConv))]


def _adam_steps(model: R2AttUNet, loss_backend: str, batches: list) -> tuple[list[list[torch.Tensor]], list]:
    """One Adam step per batch in training mode: per step [logits, loss, every parameter gradient];
    then every parameter and buffer."""
    model.train()
    loss_fn = HybridLoss(pos_weight=2.0, backend=loss_backend)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    steps = []
    for x, y in batches:
        opt.zero_grad()
        logits = model(x)
        loss = loss_fn(logits, y)
        loss.backward()
        steps.append([logits.detach(), loss.detach()] + [p.grad.clone() for p in model.parameters()])
        # Those gradients are rounding noise (~1e-16, compared above), which Adam (eps 1e-8) would turn
        # into steps of ~1e-9 of random sign on either backend: the biases keep their exact gradient.
        for bias in _biases_before_batchnorm(model):
            bias.grad.zero_()
        opt.step()
    return steps, [p.detach() for p in model.parameters()] + list(model.buffers())


def _one_step(model: R2AttUNet, loss_backend: str, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """A training-mode forward and backward: [logits, loss, every parameter gradient, every buffer]."""
    model.train()
    logits = model(x)
    loss = HybridLoss(pos_weight=2.0, backend=loss_backend)(logits, y)
    loss.backward()
    return [logits.detach(), loss.detach()] + [p.grad for p in model.parameters()] + list(model.buffers())


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("backend", CPU_ONLY)
def test_fast_model_follows_the_reference_over_adam_steps_and_shares_its_checkpoints(backend, block):
    ref, fast = _models(block, backend)
    batches = _batches(3, (2, 3, 16, 16), backend.device, torch.float64)
    got_steps, got_state = _adam_steps(fast, backend.name, batches)
    want_steps, want_state = _adam_steps(ref, "reference", batches)
    for got, want in zip(got_steps, want_steps):
        assert_all_close(got, want, 1e-9)
    assert_all_close(got_state, want_state, 1e-9)
    assert [int(b) for b in fast.buffers() if b.dtype == torch.int64] == \
        [int(b) for b in ref.buffers() if b.dtype == torch.int64]
    assert min(int(b) for b in fast.buffers() if b.dtype == torch.int64) == 3  # every BatchNorm counted its batches

    # one state_dict layout on every backend: a fast model's checkpoint loads into a reference model
    state = fast.state_dict()
    assert [(k, v.shape) for k, v in state.items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    reloaded = R2AttUNet(base_channels=4, depth=3, t=2, block=block, attention=True, backend="reference")
    reloaded.to(backend.device, torch.float64).load_state_dict(state)  # strict
    x = batches[0][0]
    with torch.no_grad():
        fast_eval, reloaded_eval = fast.eval()(x), reloaded.eval()(x)
    assert_all_close([fast_eval], [reloaded_eval], 1e-11)


@pytest.mark.parametrize("backend", CPU_ONLY)
def test_float32_fast_model_errs_no_more_than_twice_the_float32_reference(backend):
    # error(fast fp32 vs fp64 reference) <= 2 x error(reference fp32 vs fp64) + a few fp32 ulp (unit scale:
    # the conv biases before each BatchNorm have exact gradient 0 and both sides give rounding noise there).
    # One step, no optimizer: Adam would turn that noise into full-size steps of random sign.
    exact_model, fast64 = _models("residual", backend)
    ref, fast = copy.deepcopy(exact_model).float(), copy.deepcopy(fast64).float()  # weights rounded once
    ((x, y),) = _batches(1, (2, 3, 16, 16), backend.device, torch.float32)
    exact = _one_step(exact_model, "reference", x.double(), y.double())
    results = _one_step(ref, "reference", x, y), _one_step(fast, backend.name, x, y)
    eps = torch.finfo(torch.float32).eps
    for i, (e, r, f) in enumerate(zip(exact, *results)):
        assert f.dtype == r.dtype, i
        if not e.is_floating_point():
            assert torch.equal(f, r) and torch.equal(r, e.to(r.dtype)), i  # num_batches_tracked
            continue
        ref_err = (r.double() - e).abs().max().item()
        fast_err = (f.double() - e).abs().max().item()
        assert fast_err <= 2 * ref_err + 8 * eps * max(e.abs().max().item(), 1.0), (i, fast_err, ref_err)


@pytest.mark.parametrize("backend", TRITON)
def test_tiny_model_on_triton_matches_the_reference(backend):
    # Through the interpreter every layer is numpy: one step of the smallest model with a gate
    ref, fast = _models("conv", backend, base_channels=2, depth=2)
    ((x, y),) = _batches(1, (2, 3, 8, 8), backend.device, torch.float64)
    assert_all_close(_one_step(fast, backend.name, x, y), _one_step(ref, "reference", x, y), 1e-9)


# Inductor compiles the R2 model in ~2 minutes on 2 CPU cores (its g++ builds, not the tracing). The conv
# model's layers are the same op at t = 0, which the R2 model's up-convolutions already take through
# inductor, so it stops after dynamo and AOT autograd (fake kernels, autograd formula, functionalised
# running-statistics updates): ~10 s.
@pytest.mark.parametrize("block, compiler", [
    pytest.param("r2", "inductor", marks=[pytest.mark.slow, needs_compiler]),
    ("conv", "aot_eager"),
])
@pytest.mark.parametrize("backend", CPU_ONLY)
def test_compiled_fast_model_matches_eager_in_training(backend, block, compiler):
    torch.manual_seed(4)
    eager = R2AttUNet(base_channels=4, depth=3, t=2, block=block, attention=True, backend=backend.name)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)  # a graph break raises
    x = torch.randn(2, 3, 16, 16)
    weight = torch.randn(2, 1, 16, 16)
    results = []
    for net, params in ((eager, eager), (compiled, model)):
        net.train()
        logits = net(x)
        (logits * weight).sum().backward()
        noise = {id(b) for b in _biases_before_batchnorm(params)}
        results.append(dict(logits=[logits.detach()], buffers=list(params.buffers()),
                            grads=[p.grad for p in params.parameters() if id(p) not in noise],
                            noise=[b.grad for b in _biases_before_batchnorm(params)]))
    got, want = results[1], results[0]
    assert_all_close(got["logits"] + got["grads"] + got["buffers"], want["logits"] + want["grads"] + want["buffers"],
                     1e-4)
    # The biases before a BatchNorm: exact gradient 0, computed as float32 rounding noise of cancelling
    # terms that have the size of the model's largest gradients.
    unit = max(g.abs().max().item() for g in want["grads"])
    for a, b in zip(got["noise"], want["noise"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * unit)
    assert set(model.backend_report().values()) == {backend.name}
