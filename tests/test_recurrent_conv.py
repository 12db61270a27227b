"""The fused recurrent conv unit (``ops.recurrent_conv``, ``RecurrentConv``, ``RRCUBlock``) against the
reference on every fast backend on the device it serves (the C++ passes alone:
tests/test_recurrent_conv_cpu_passes.py): gradcheck, parity of outputs, every gradient and every running statistic after several
training steps for t = 0..3, tied and untied, shared and per-step norms, both layouts, eval mode,
NaN, the bf16 ratio rule, what is saved for backward, registration (opcheck), torch.compile
without graph breaks, the backend report, and bad input.
"""
from __future__ import annotations

import contextlib
import copy
import itertools

import pytest
import recurrent_conv_oracle as oracle
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from backend_cases import cases
from poison import poisoned_allocations
from unit_parity import assert_all_close, assert_bf16_ratio_rule, bf16_autocast_steps, pair, randn_input, train_steps

from r2unet_fast import ops
from r2unet_fast.nn import RecurrentConv
from r2unet_fast.nn.blocks import RRCUBlock
from r2unet_fast.ops.library import recurrent_conv as lib
from r2unet_fast.ops.library import recurrent_conv_steps as steps

BACKENDS = cases("recurrent_conv")
CPU_ONLY = cases("recurrent_conv", ("cpu",))
_CPP_REASON = ops.available_backends("recurrent_conv", "cpu")["cpu"]
requires_cpp = pytest.mark.skipif(_CPP_REASON is not None, reason=f"cpu backend: {_CPP_REASON}")


def _gradcheck_params() -> list:
    """Per backend the registered op (what torch.compile runs), and the eager path where it has one."""
    params = []
    for case in BACKENDS:
        backend = case.values[0]
        for registered_op in (True, False) if backend.name in lib._EAGER_BACKENDS else (True,):
            path = "registered_op" if registered_op else "eager_path"
            params.append(pytest.param(backend, registered_op, marks=case.marks, id=f"{path}-{case.id}"))
    return params


@pytest.mark.parametrize("backend, registered_op", _gradcheck_params())
def test_gradcheck(backend, registered_op, monkeypatch):
    if registered_op:  # the library op and its registered autograd formula
        monkeypatch.setattr(lib, "_EAGER", {})
    c = 3
    x = randn_input(2, 2, 3, 4, device=backend.device).requires_grad_()
    w_f = (torch.randn(c, 2, 3, 3, dtype=torch.float64) * 0.3).to(backend.device).requires_grad_()
    b_f = torch.randn(c, dtype=torch.float64, device=backend.device).requires_grad_()
    w_r = (torch.randn(c, c, 3, 3, dtype=torch.float64) * 0.3).to(backend.device).requires_grad_()
    gammas = [(torch.rand(c, dtype=torch.float64) + 0.5).to(backend.device).requires_grad_() for _ in range(3)]
    betas = [torch.randn(c, dtype=torch.float64, device=backend.device).requires_grad_() for _ in range(3)]
    residual = torch.randn(2, c, 3, 4, dtype=torch.float64, device=backend.device).requires_grad_()
    stats = [torch.zeros(c, dtype=torch.float64, device=backend.device) for _ in range(3)]

    def fn(x, w_f, b_f, w_r, g0, g1, g2, b0, b1, b2, residual):
        return ops.recurrent_conv(x, w_f, b_f, w_r, [g0, g1, g2], [b0, b1, b2], stats, [s + 1 for s in stats],
                                  t=2, training=True, residual=residual, backend=backend.name)

    assert torch.autograd.gradcheck(fn, (x, w_f, b_f, w_r, *gammas, *betas, residual), eps=1e-6, atol=1e-6,
                                    fast_mode=True)


CONFIGS = list(itertools.product([0, 1, 2, 3], [False, True], [False, True]))
# Through the Triton interpreter (minutes per configuration) a spread of configurations: the step
# loop around the passes is the same Python for both backends, and the cpu backend runs them all.
INTERPRETED = [(3, True, True)]


def _block_params() -> list:
    params = []
    for case in BACKENDS:
        interpreted = case.values[0].name == "triton" and case.values[0].device.type == "cpu"
        for t, tied, shared in INTERPRETED if interpreted else CONFIGS:
            params.append(pytest.param(case.values[0], t, tied, shared, marks=case.marks,
                                       id=f"t{t}-{'tied' if tied else 'untied'}-{'shared' if shared else 'per_step'}"
                                          f"-{case.id}"))
    return params


@pytest.mark.parametrize("backend, t, tied, shared_norm", _block_params())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_rrcu_block_matches_the_reference_in_training_and_eval(backend, t, tied, shared_norm, channels_last):
    ref, fast = pair(RRCUBlock(5, 6, t, tied=tied, shared_norm=shared_norm), backend)
    x = randn_input(2, 5, 7, 9, device=backend.device, channels_last=channels_last)
    got, want = train_steps(fast, x), train_steps(ref, x)
    assert_all_close(got, want, 1e-9)
    assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ref.eval(), fast.eval()
    with torch.no_grad():
        assert_all_close([fast(x)], [ref(x)], 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("batch", [3, 5], ids=["3_images", "5_images"])
def test_backward_by_image_groups_matches_the_reference(backend, channels_last, batch, monkeypatch):
    # large activations take the recurrent convolution's backward a group of images at a time
    # (uneven groups for 3 and 5 images; dh_{k-1} overwrites ds_k group by group)
    # (through ATen's convolutions here; tests/test_conv3x3_winograd.py takes the C++ kernel's path)
    monkeypatch.setattr(steps, "RECOMPUTE_BYTES", 1)
    assert len(steps._image_groups(torch.empty(batch, 1, 1, 1))) == min(batch, steps.RECOMPUTE_GROUPS)
    with _conv_impl(backend, "aten"):
        for tied in (False, True):
            ref, fast = pair(RRCUBlock(4, 4, 2, tied=tied), backend)
            x = randn_input(batch, 4, 5, 7, device=backend.device, channels_last=channels_last)
            assert_all_close(train_steps(fast, x, steps=2), train_steps(ref, x, steps=2), 1e-9)


def _conv_impl(backend, impl: str):
    """The Triton backend's 3x3 convolutions forced to ``impl`` ("triton" or "aten")."""
    if backend.name != "triton":
        return contextlib.nullcontext()
    from r2unet_fast.ops.triton import conv3x3
    return conv3x3.forced(impl)


@pytest.mark.parametrize("backend", cases("recurrent_conv", ("triton",)))
@pytest.mark.parametrize("impl", ["triton", "aten"], ids=["implicit_gemm", "cudnn_and_passes"])
def test_triton_backend_matches_the_reference_on_either_convolution(backend, impl):
    # the fused implicit-GEMM step (prologue, add + statistics epilogue, Triton gradients) and the
    # unfused one, untied with a norm per step; training steps, then eval
    with _conv_impl(backend, impl):
        ref, fast = pair(RRCUBlock(5, 6, 2, tied=False, shared_norm=False), backend)
        x = randn_input(2, 5, 7, 9, device=backend.device, channels_last=True)
        assert_all_close(train_steps(fast, x, steps=2), train_steps(ref, x, steps=2), 1e-9)
        ref.eval(), fast.eval()
        with torch.no_grad():
            assert_all_close([fast(x)], [ref(x)], 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_recurrent_conv_alone_float32_running_stats_and_momentum(backend, momentum):
    block = RecurrentConv(5, 6, 2)
    for norm in block.norms:
        norm.momentum = momentum
    ref, fast = pair(block, backend, torch.float32)
    x = randn_input(3, 5, 7, 6, device=backend.device, dtype=torch.float32, channels_last=True)
    assert_all_close(train_steps(fast, x, steps=3), train_steps(ref, x, steps=3), 2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_with_gradients_matches_the_reference(backend):
    ref, fast = pair(RRCUBlock(4, 4, 2), backend)
    x = randn_input(2, 4, 5, 6, device=backend.device)
    train_steps(ref, x, 1), train_steps(fast, x, 1)
    for model in (ref, fast):
        model.zero_grad()
        model.eval()
    got, want = train_steps(fast, x, 1, train=False), train_steps(ref, x, 1, train=False)
    assert_all_close(got, want, 1e-9)
    assert fast.rc1.runs_on() == "cpu" or fast.rc1.runs_on().startswith("triton")  # it is the fast module's call


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_like_the_reference(backend):
    ref, fast = pair(RRCUBlock(3, 4, 2), backend)
    x = randn_input(2, 3, 6, 5, device=backend.device)
    x[1, 2, 3, 1] = float("nan")
    got, want = train_steps(fast, x, 1), train_steps(ref, x, 1)
    for a, b in zip(got, want):
        if a is not None:
            assert torch.equal(a.isnan(), b.isnan())


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_buffers_are_fully_written(backend, monkeypatch):
    ref, fast = pair(RRCUBlock(3, 4, 2), backend)
    x = randn_input(2, 3, 6, 5, device=backend.device, channels_last=True)
    want = train_steps(ref, x, 1)
    with poisoned_allocations(monkeypatch):
        got = train_steps(fast, x, 1)
    assert_all_close(got, want, 1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_ratio_rule(backend):
    block = RRCUBlock(6, 8, 2)
    x = randn_input(2, 6, 9, 7, device=backend.device, dtype=torch.float32, channels_last=True)
    assert_bf16_ratio_rule(*bf16_autocast_steps(block, backend, x))


def _saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x.detach().clone().requires_grad_())
    return sum(seen.values())


@requires_cpp
def test_eager_path_and_registered_op_give_the_same_bits(monkeypatch):
    # eager mode skips torch.library's per-call machinery (lib._EAGER); both run one implementation
    eager = RRCUBlock(5, 6, 2, backend="cpu").double()
    registered = copy.deepcopy(eager)
    x = randn_input(3, 5, 7, 9, channels_last=True)
    got = train_steps(eager, x, steps=2)
    eager.eval()
    with torch.no_grad():
        got.append(eager(x))
    monkeypatch.setattr(lib, "_EAGER", {})
    want = train_steps(registered, x, steps=2)
    registered.eval()
    with torch.no_grad():
        want.append(registered(x))
    assert_all_close(got, want, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_only_inputs_and_step_states_for_backward(backend):
    ref, fast = pair(RRCUBlock(8, 8, 2), backend, torch.float32)
    x = randn_input(2, 8, 16, 16, device=backend.device, dtype=torch.float32, channels_last=True)
    ref.train(), fast.train()
    saved_fast, saved_ref = _saved_bytes(fast, x), _saved_bytes(ref, x)
    act = x.numel() * x.element_size()  # one activation (8 channels in and out)
    # eager: x, x0, and per unit each step's BatchNorm input and ReLU output (the ReLU outputs are the
    # next convolution's inputs): 2 + 2 * 2 * 3 = 14 activations. Fused: x, x0, rc1's output (rc2's
    # input) and per unit each s_k: 3 + 2 * 3 = 9, plus weights and per-channel statistics.
    assert saved_ref >= 14 * act
    assert 9 * act <= saved_fast <= 9 * act + 64 * 1024, (saved_fast / act, saved_ref / act)


class _FullSizeFills(TorchDispatchMode):
    """Counts zero-filled tensors of ``numel`` elements created while active."""

    FILLS = {torch.ops.aten.zeros_like.default, torch.ops.aten.zeros.default, torch.ops.aten.new_zeros.default,
             torch.ops.aten.fill_.Scalar, torch.ops.aten.zero_.default}

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.FILLS and isinstance(out, torch.Tensor) and out.numel() == self.numel:
            self.count += 1
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_gets_no_zero_gradients_for_the_saved_states(backend):
    # the step states are outputs of the op (saved for backward, never differentiated); autograd
    # must not materialise an activation-sized zero gradient for each of them
    _, fast = pair(RRCUBlock(8, 8, 2), backend, torch.float32)
    x = randn_input(2, 8, 16, 16, device=backend.device, dtype=torch.float32, channels_last=True)
    fast.train()
    out = fast(x)
    with _FullSizeFills(out.numel()) as fills:
        out.sum().backward()
    assert fills.count == 0
    assert all(p.grad is not None for p in fast.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_pass_opcheck(backend):
    lib.register(backend.name)
    namespace = torch.ops.r2unet_fast
    train = getattr(namespace, lib.op_name(backend.name, "train"))
    evaluate = getattr(namespace, lib.op_name(backend.name, "eval"))
    dev = backend.device
    x = randn_input(2, 3, 4, 5, device=dev)
    w_f, w_r = torch.randn(4, 3, 3, 3, dtype=x.dtype, device=dev), torch.randn(4, 4, 3, 3, dtype=x.dtype, device=dev)
    b_f, gamma, beta = (torch.randn(k, dtype=x.dtype, device=dev) for k in (4, (3, 4), (3, 4)))
    residual = torch.randn(2, 4, 4, 5, dtype=x.dtype, device=dev)
    for res in (None, residual):
        args = [t.clone().requires_grad_() for t in (x, w_f, b_f, w_r, gamma, beta)]
        torch.library.opcheck(train.default, (*args, res, 2, 1e-5))
    torch.library.opcheck(evaluate.default, (x, w_f, b_f, w_r, gamma, beta, residual, 2))
    # t = 0 without a recurrent weight (ConvBNReLU): w_r is ``Tensor?``
    args = [t.clone().requires_grad_() for t in (x, w_f, b_f)]
    norm = [v[:1].clone().requires_grad_() for v in (gamma, beta)]
    torch.library.opcheck(train.default, (*args, None, *norm, residual, 0, 1e-5))
    torch.library.opcheck(evaluate.default, (x, w_f, b_f, None, gamma[:1], beta[:1], None, 0))


@pytest.mark.parametrize("backend", CPU_ONLY)
def test_block_compiles_without_graph_breaks(backend):
    ref, fast = pair(RRCUBlock(3, 4, 2), backend, torch.float32)
    x = randn_input(2, 3, 8, 6, dtype=torch.float32, channels_last=True)
    compiled = copy.deepcopy(fast)

    def step(model, x):
        return model(x).square().mean()

    compiled_step = torch.compile(step, fullgraph=True)
    for model, fn in ((fast, step), (compiled, compiled_step)):
        model.train()
        loss = fn(model, x)
        loss.backward()
    assert_all_close([p.grad for p in compiled.parameters()] + list(compiled.buffers()),
                      [p.grad for p in fast.parameters()] + list(fast.buffers()), 1e-5)


def test_synchronised_norms_stay_on_the_reference_and_say_why():
    from r2unet_fast.nn.sync_norm import DistributedBatchNorm2d

    block = RecurrentConv(4, 4, 1, backend="auto")
    assert not block.runs_on().startswith("reference")
    block.norms[0] = DistributedBatchNorm2d(4)
    assert block.runs_on().startswith("reference (DistributedBatchNorm2d norms")
    assert "runs_on='reference (" in repr(block)


@pytest.mark.parametrize("kwargs, message", [
    (dict(t=-1), "t (recurrent steps) must be an int >= 0"),
    (dict(t=3), "one BatchNorm shared by every step or one per step"),
    (dict(w_r=torch.randn(4, 3, 3, 3)), "w_r"),
    (dict(w_r=None), "w_r (the recurrent weight, (C, C, 3, 3)) is needed for t = 2 > 0"),
    (dict(x=torch.randn(2, 5, 6, 6)), "w_f"),
    (dict(x=torch.randn(1, 3, 1, 1)), "more than one value per channel"),
    (dict(betas=[torch.zeros(4)]), "betas must have one entry per BatchNorm"),
])
def test_bad_input_raises_a_clear_error(kwargs, message):
    args = dict(x=torch.randn(2, 3, 6, 6), w_f=torch.randn(4, 3, 3, 3), b_f=torch.zeros(4), w_r=torch.randn(4, 4, 3, 3),
                gammas=[torch.ones(4)] * 3, betas=[torch.zeros(4)] * 3, running_means=[torch.zeros(4)] * 3,
                running_vars=[torch.ones(4)] * 3, t=2, training=True)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ops.recurrent_conv(**args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_relu_backward_stops_the_gradient_at_exactly_zero(backend):
    # eager relu's backward (threshold_backward) gives 0 where the output is exactly 0; a pass that
    # tests "< 0" instead would let the upstream gradient through there
    import importlib

    passes = importlib.import_module(lib._LAUNCHERS[backend.name])
    s = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    s[:, :, ::2] = 0.0  # pre-activation s * scale + 0 is exactly 0 here
    s = s.to(backend.device)
    dh = torch.randn_like(s)
    scale, shift = torch.rand(3, dtype=s.dtype, device=s.device) + 0.5, torch.zeros(3, dtype=s.dtype, device=s.device)
    mean, rstd, gamma = (torch.randn(3, dtype=s.dtype, device=s.device) for _ in range(3))
    got = passes.rc_bn_relu_bwd(s, dh, scale, shift, mean, rstd, gamma, None, True)
    want = oracle.rc_bn_relu_bwd(s.cpu(), dh.cpu(), scale.cpu(), shift.cpu(), mean.cpu(), rstd.cpu(), gamma.cpu(),
                                 None, True)
    assert_all_close([g.cpu() for g in got], list(want), 1e-12)
