"""AttentionGate and R2AttUNet on the fused gate: both norm variants in training and eval,
running statistics, and the report of where each gate runs."""
from __future__ import annotations

import copy

import pytest
import torch
from backend_cases import Case, cases

from r2unet_fast import R2AttUNet
from r2unet_fast.nn import AttentionGate

BACKENDS = cases("attention_gate")


def _pair(backend: Case, norm: bool) -> tuple[AttentionGate, AttentionGate]:
    torch.manual_seed(5)
    ref = AttentionGate(5, 7, 3, norm=norm, backend="reference").double().to(backend.device)
    fast = copy.deepcopy(ref)
    fast.backend = backend.name
    return ref, fast


def _step(gate: AttentionGate, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    """out, psi and every parameter's gradient of one forward/backward."""
    gate.zero_grad()
    leaves = [t.detach().clone().requires_grad_() for t in (x, g)]
    out, psi = gate(*leaves, return_psi=True)
    (out.square().sum() + psi.sum()).backward()
    return [out.detach(), psi.detach()] + [t.grad for t in leaves] + [p.grad for p in gate.parameters()]


def _batch(device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 9, 7, generator=gen, dtype=torch.float64) * 2 + 1
    g = torch.randn(3, 7, 9, 7, generator=gen, dtype=torch.float64)
    return x.to(device), g.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gate_matches_the_reference_module(backend, norm, train):
    ref, fast = _pair(backend, norm)
    for seed in range(3):  # several steps: running statistics move in training mode
        ref.train(train), fast.train(train)
        x, g = _batch(backend.device, seed)
        for a, b in zip(_step(fast, x, g), _step(ref, x, g)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for a, b in zip(fast.buffers(), ref.buffers()):
        assert torch.equal(a, b), "running statistics and num_batches_tracked follow the reference"
    if norm and train:
        ref.eval(), fast.eval()  # eval after training: the folded statistics are the updated ones
        x, g = _batch(backend.device, 9)
        for a, b in zip(_step(fast, x, g), _step(ref, x, g)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_where_each_gate_runs_is_reported(backend):
    _, plain = _pair(backend, norm=False)
    _, normed = _pair(backend, norm=True)
    assert plain.train().runs_on() == backend.name and normed.eval().runs_on() == backend.name
    normed.train()
    assert normed.runs_on().startswith("reference (norm=True in training mode")
    assert "runs_on=" in repr(normed) and "reference (norm=True in training mode" in repr(normed)


@pytest.mark.parametrize("backend", cases("attention_gate", ("cpu",)))
def test_r2attunet_runs_its_gates_on_the_fused_op_by_default(backend):
    def gates(model: R2AttUNet) -> set[str]:
        return {where for name, where in model.backend_report().items() if name.startswith("gates")}

    assert gates(R2AttUNet(base_channels=4, depth=3, t=1)) == {"cpu"}
    popular = R2AttUNet(base_channels=4, depth=3, t=1, attention_norm=True)
    assert gates(popular.eval()) == {"cpu"}
    (where,) = gates(popular.train())
    assert where.startswith("reference (norm=True in training mode")


@pytest.mark.parametrize("backend", cases("attention_gate", ("cpu",)))
def test_cpu_gate_keeps_its_preactivation_only_when_a_backward_can_follow(backend):
    from torch.profiler import ProfilerActivity, profile

    ref, fast = _pair(backend, norm=False)
    x, g = _batch(backend.device, 1)

    def ops_run(fn) -> set[str]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return {e.name for e in prof.events() if e.name.startswith("r2unet_fast::")}

    with torch.no_grad():
        assert ops_run(lambda: fast(x, g)) == {"r2unet_fast::attention_gate_cpu_infer"}
        torch.testing.assert_close(fast(x, g), ref(x, g), rtol=1e-12, atol=1e-12)
    assert ops_run(lambda: fast(x, g)) == {"r2unet_fast::attention_gate_cpu"}
