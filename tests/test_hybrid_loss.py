"""Fused hybrid loss (Triton through the interpreter on CPU, C++) against the reference.

docs/design.md section 3: gradcheck in float64, parity for every option at shapes
that are no multiple of any block size, any memory layout, NaN-poisoned
output buffers, extreme logits, grad_output != 1, the bf16/fp16 ratio rule,
autocast, dispatch and validation. CUDA-only cases are marked ``cuda``.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from backend_cases import TRITON_DEVICE, Case, cases
from poison import poisoned_allocations
from hypothesis import given, settings
from hypothesis import strategies as st

from r2unet_fast import ops
from r2unet_fast.ops import dispatch, reference
from r2unet_fast.ops.dispatch import available_backends
from r2unet_fast.ops.library import hybrid_loss as lib

FAST = {"triton": lib.hybrid_loss_triton, "cpu": lib.hybrid_loss_cpu}
BACKENDS = cases("hybrid_loss")
CPU_ONLY = cases("hybrid_loss", ("cpu",))
# relative to the largest expected magnitude, per dtype of the compared tensors
TOL = {torch.float64: 1e-10, torch.float32: 2e-6}
OPTIONS = [
    {},
    {"dice_weight": 0.0, "bce_weight": 1.0, "pos_weight": 3.0},
    {"dice_weight": 1.0, "bce_weight": 0.0, "smooth": 0.0},
    {"dice_weight": 0.7, "bce_weight": 0.3, "pos_weight": 0.5, "smooth": 2.5, "per_image": False},
    {"per_image": False, "pos_weight": 0.0},
]


def _inputs(shape, dtype=torch.float64, soft=True, scale=3.0, device="cpu"):
    # drawn on the CPU so every device sees the same numbers for a seed
    logits = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    target = torch.rand(shape, dtype=torch.float64) if soft else (torch.rand(shape, dtype=torch.float64) > 0.6).double()
    return logits.to(device), target.to(dtype).to(device)


def _tol(dtype, device):
    # compiled CUDA exp/log are approximate to a few ulp; the interpreter and C++ use libm
    if dtype == torch.float32 and torch.device(device).type == "cuda":
        return 1e-5
    return TOL[dtype]


def _loss_and_grads(fn, logits, target, grad_target=True, scale=1.0, views=(None, None), **kw):
    """Loss and the gradients of the leaves; ``views`` map the leaves to the tensors the loss sees."""
    logits = logits.detach().clone().requires_grad_()
    target = target.detach().clone().requires_grad_(grad_target)
    x, t = (v(a) if v is not None else a for v, a in zip(views, (logits, target)))
    loss = fn(x, t, **kw)
    (loss * scale).backward()
    return loss.detach(), logits.grad, target.grad


def _assert_close(actual, expected, tol):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "non-finite values"
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def _assert_matches_reference(backend, logits, target, tol=None, grad_target=True, scale=1.0, **kw):
    tol = _tol(reference.compute_dtype(logits), logits.device) if tol is None else tol
    got = _loss_and_grads(FAST[backend.name], logits, target, grad_target, scale, **kw)
    want = _loss_and_grads(reference.hybrid_loss, logits, target, grad_target, scale, **kw)
    for a, b in zip(got, want):
        if b is None:
            assert a is None
        else:
            _assert_close(a, b, tol)


def test_fast_paths_take_the_reference_signature():
    for fn in FAST.values():
        assert inspect.signature(fn) == inspect.signature(reference.hybrid_loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    logits, target = _inputs((2, 1, 4, 5), device=backend.device)
    logits.requires_grad_()
    target.requires_grad_()
    loss = FAST[backend.name]
    assert torch.autograd.gradcheck(lambda x, t: loss(x, t, pos_weight=2.0), (logits, target))
    assert torch.autograd.gradcheck(lambda x, t: loss(x, t, pos_weight=0.3, per_image=False, smooth=0.5),
                                    (logits, target))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(3, 1, 37, 29), (1, 1, 67, 71)])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_matches_reference(backend, dtype, shape, options):
    for soft in (True, False):
        _assert_matches_reference(backend, *_inputs(shape, dtype, soft, device=backend.device), **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_scale_and_target_without_grad(backend):
    logits, target = _inputs((2, 1, 11, 13), torch.float32, device=backend.device)
    _assert_matches_reference(backend, logits, target, scale=3.7, pos_weight=1.5)
    _assert_matches_reference(backend, logits, target, grad_target=False, scale=-0.25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_target_requires_grad(backend):
    logits, target = _inputs((2, 1, 9, 7), device=backend.device)
    t1, t2 = target.clone().requires_grad_(), target.clone().requires_grad_()
    FAST[backend.name](logits, t1, pos_weight=2.0).backward()
    reference.hybrid_loss(logits, t2, pos_weight=2.0).backward()
    _assert_close(t1.grad, t2.grad, TOL[torch.float64])


def _layouts(dtype, device):
    """(name, logits, target, views) in layouts the kernels must not care about."""
    n, c, h, w = 3, 2, 9, 7
    logits, target = _inputs((n, c, h, w), dtype, device=device)
    big_x, big_t = _inputs((n, c, 2 * h + 1, w + 3), dtype, device=device)
    cl = torch.channels_last
    return [
        ("channels_last", logits.to(memory_format=cl), target, (None, None)),
        ("both_channels_last", logits.to(memory_format=cl), target.to(memory_format=cl), (None, None)),
        ("transposed", logits.transpose(2, 3).contiguous().transpose(2, 3), target, (None, None)),
        ("sliced", big_x, big_t, (lambda a: a[:, :, 1::2, 2:-1], lambda a: a[:, :, :-1:2, 3:])),
        ("batch_slice", big_x, big_t, (lambda a: a[1:, :, :h, :w], lambda a: a[1:, :, :h, :w])),
        ("expanded_target", logits, target[:1], (None, lambda a: a.expand(n, c, h, w))),
        ("sliced_channels_last", big_x.to(memory_format=cl), big_t,
         (lambda a: a[:, :, 1:, 1:], lambda a: a[:, :, 1:, 1:])),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_memory_layouts(backend, dtype):
    for name, x, t, views in _layouts(dtype, backend.device):
        got = _loss_and_grads(FAST[backend.name], x, t, views=views, pos_weight=2.0)
        want = _loss_and_grads(reference.hybrid_loss, x, t, views=views, pos_weight=2.0)
        for a, b in zip(got, want):
            assert a.stride() == b.stride() or a.dim() == 0, name
            _assert_close(a, b, TOL[dtype])


def test_inputs_are_copied_only_when_the_kernels_need_it():
    cl = torch.channels_last
    x, t = _inputs((2, 3, 5, 4), torch.float32)
    x1, t1 = _inputs((2, 1, 5, 4), torch.float32)
    # same dense layout (for C = 1 contiguous and channels_last are one memory order): no copy
    for a, b in [(x, t), (x.to(memory_format=cl), t.to(memory_format=cl)), (x1, t1.to(memory_format=cl))]:
        px, pt = lib.prepare_inputs(a, b)
        assert px.data_ptr() == a.data_ptr() and pt.data_ptr() == b.data_ptr()
    px, pt = lib.prepare_inputs(x.to(memory_format=cl), t)
    assert pt.is_contiguous(memory_format=cl), "target follows the logits' layout"
    px, pt = lib.prepare_inputs(x1, t1.double())
    assert pt.dtype == torch.float32, "a target dtype the kernels do not take becomes the compute dtype"


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_in_another_dtype(backend):
    logits, target = _inputs((2, 1, 9, 7), torch.float32, soft=False, device=backend.device)
    _assert_matches_reference(backend, logits, target.half())
    _assert_matches_reference(backend, logits, target.double())
    _assert_matches_reference(backend, logits.double(), target.float())
    # half-precision logits with a float32 target: the kernels read two element types
    _assert_matches_reference(backend, logits.bfloat16(), target.float(), tol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_buffers_are_fully_written(backend, monkeypatch):
    logits, target = _inputs((3, 1, 37, 29), torch.float32, device=backend.device)
    with poisoned_allocations(monkeypatch):
        assert torch.isnan(torch.empty(2, device=backend.device)).all()
        got = _loss_and_grads(FAST[backend.name], logits, target, per_image=False)
    want = _loss_and_grads(reference.hybrid_loss, logits, target, per_image=False)
    for a, b in zip(got, want):
        _assert_close(a, b, _tol(torch.float32, backend.device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_extreme_logits_stay_finite(backend, dtype):
    logits = torch.tensor([80.0, -80.0, 0.5, 30.0, -30.0, 17.0]).repeat(2, 1, 3, 1).to(backend.device, dtype)
    target = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.5]).repeat(2, 1, 3, 1).to(backend.device, dtype)
    got = _loss_and_grads(FAST[backend.name], logits, target, pos_weight=2.0)
    want = _loss_and_grads(reference.hybrid_loss, logits, target, pos_weight=2.0)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-2, atol=1e-2 * b.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bce_gradient_at_zero_logits(backend):
    # BCE is smooth at x = 0 (d/dx = p - 1 weighted), which torch's own BCE-with-logits gets right
    logits = torch.tensor([0.0, 0.0, -0.0, 2.0, -3.0, 0.0], dtype=torch.float64, device=backend.device).reshape(2, 1, 1, 3)
    target = torch.tensor([1.0, 0.0, 1.0, 0.3, 1.0, 0.5], dtype=torch.float64, device=backend.device).reshape(2, 1, 1, 3)
    bce = lambda x, t: torch.nn.functional.binary_cross_entropy_with_logits(  # noqa: E731
        x, t, pos_weight=torch.tensor(2.0, dtype=torch.float64, device=backend.device))
    got = _loss_and_grads(FAST[backend.name], logits, target, dice_weight=0.0, bce_weight=1.0, pos_weight=2.0)
    want = _loss_and_grads(bce, logits, target)
    for a, b in zip(got, want):
        _assert_close(a, b, TOL[torch.float64])


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_ratio_rule(backend, dtype):
    # error(fast vs float64 reference) <= 2 x error(reference in dtype vs float64 reference) + floor
    logits, target = _inputs((2, 1, 23, 19), torch.float64, soft=True, device=backend.device)
    lo = (logits.to(dtype), target.to(dtype))
    exact = _loss_and_grads(reference.hybrid_loss, logits, target, pos_weight=2.0)
    ref_lo = _loss_and_grads(reference.hybrid_loss, *lo, pos_weight=2.0)
    fast_lo = _loss_and_grads(FAST[backend.name], *lo, pos_weight=2.0)
    for name, f, r, e in zip(("loss", "grad_logits", "grad_target"), fast_lo, ref_lo, exact):
        assert f.dtype == r.dtype
        floor = 1e-6 * e.abs().max().item()
        assert _max_err(f, e) <= 2 * _max_err(r, e) + floor, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_autocast(backend):
    conv = torch.nn.Conv2d(3, 1, 3, padding=1).to(backend.device)
    image = torch.randn(2, 3, 13, 11, device=backend.device)
    target = (torch.rand(2, 1, 13, 11, device=backend.device) > 0.5).float()
    results = []
    for fn in (FAST[backend.name], reference.hybrid_loss):
        conv.zero_grad()
        with torch.autocast(backend.device.type, dtype=torch.bfloat16):
            logits = conv(image)
            loss = fn(logits, target, pos_weight=2.0)
        assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
        loss.backward()
        results.append((loss.detach(), conv.weight.grad.clone()))
    for a, b in zip(*results):
        _assert_close(a, b, 1e-3)


@pytest.mark.parametrize("backend", CPU_ONLY)
def test_deterministic_across_thread_counts(backend):
    logits, target = _inputs((4, 1, 97, 101), torch.float32)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            runs.append(_loss_and_grads(FAST[backend.name], logits, target))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_ONLY)
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 4), h=st.integers(1, 40), w=st.integers(1, 40), options=st.sampled_from(OPTIONS),
       soft=st.booleans())
def test_random_shapes_cpu(backend, n, h, w, options, soft):
    _assert_matches_reference(backend, *_inputs((n, 1, h, w), soft=soft), **options)


@pytest.mark.parametrize("backend", CPU_ONLY)
def test_cpp_checks_its_inputs(backend):
    from r2unet_fast.ops.extension import load_extension

    _C = load_extension()

    x, t = torch.randn(2, 1, 4, 4), torch.rand(2, 1, 4, 4)
    loss, coef, opts = torch.empty(()), torch.empty(2, 5), (1.0, 0.5, 0.5, 1.0, True)
    fwd = lambda x, t, loss=loss, coef=coef: _C.hybrid_loss_fwd(x, t, loss, coef, *opts)  # noqa: E731
    fwd(x.transpose(2, 3), t.transpose(2, 3))  # images stay dense blocks: accepted
    batch_inner = torch.randn(4, 4, 2, 1).permute(2, 3, 0, 1)
    for bad in (x[:, :, ::2], batch_inner):
        with pytest.raises(RuntimeError, match="must be dense"):
            fwd(bad, bad.clone())
    with pytest.raises(RuntimeError, match="memory layout"):
        fwd(x, t.transpose(2, 3))
    with pytest.raises(RuntimeError, match="coef must be"):
        fwd(x, t, coef=torch.empty(2, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="loss must be"):
        fwd(x, t, loss=torch.empty(1))
    with pytest.raises(RuntimeError, match="target dtype"):
        fwd(x.half(), t.bfloat16())
    with pytest.raises(RuntimeError, match="grad_logits must have dtype"):
        _C.hybrid_loss_bwd(x, t, coef, loss, torch.empty(2, 1, 4, 4, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="grad_loss must be"):
        _C.hybrid_loss_bwd(x, t, coef, torch.empty((), dtype=torch.float64), torch.empty_like(x), None)


def test_auto_picks_the_cpu_kernel_for_cpu_tensors(monkeypatch):
    reason = available_backends("hybrid_loss", "cpu")["cpu"]
    if reason is not None:
        pytest.skip(f"cpu: {reason}")
    calls = []
    real = lib.hybrid_loss_cpu
    monkeypatch.setitem(dispatch._KERNELS["hybrid_loss"], "cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    logits, target = _inputs((2, 1, 5, 5), torch.float32)
    loss = ops.hybrid_loss(logits, target)
    assert calls == [1]
    _assert_close(loss, reference.hybrid_loss(logits, target), TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_op_runs_the_requested_backend(backend):
    logits, target = _inputs((2, 1, 5, 6), torch.float32, device=backend.device)
    assert dispatch.resolve("hybrid_loss", backend.name, logits.device) == backend.name
    _assert_close(ops.hybrid_loss(logits, target, backend=backend.name, pos_weight=2.0),
                  reference.hybrid_loss(logits, target, pos_weight=2.0), _tol(torch.float32, backend.device))


@pytest.mark.parametrize("backend", [pytest.param(Case(b, torch.device(TRITON_DEVICE)), id=b) for b in ("auto", "reference")] + BACKENDS)
@pytest.mark.parametrize("bad", ["shape", "int_logits", "int_target", "empty_batch", "empty_image", "scalar",
                                 "pos_weight", "smooth", "nan_weight"])
def test_bad_input_raises_before_any_kernel(backend, bad, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran on invalid input")

    monkeypatch.setattr(lib, "_hybrid_loss", no_kernel)
    monkeypatch.setattr(reference, "hybrid_loss_sums", no_kernel)
    x, t = torch.randn(2, 1, 4, 4, device=backend.device), torch.rand(2, 1, 4, 4, device=backend.device)
    kw = {}
    if bad == "shape":
        t = t[:, :, :3]
    elif bad == "int_logits":
        x = x.long()
    elif bad == "int_target":
        t = (t > 0.5).to(torch.uint8)
    elif bad == "empty_batch":
        x, t = x[:0], t[:0]
    elif bad == "empty_image":
        x, t = x[:, :, :0], t[:, :, :0]
    elif bad == "scalar":
        x, t = x[0, 0, 0, 0], t[0, 0, 0, 0]
    else:
        kw = {"pos_weight": {"pos_weight": -1.0}, "smooth": {"smooth": -0.5},
              "nan_weight": {"dice_weight": float("nan")}}[bad]
    with pytest.raises(ValueError):
        ops.hybrid_loss(x, t, backend=backend.name, **kw)


@pytest.mark.cuda
def test_cuda_mixed_devices_raise():
    with pytest.raises(ValueError, match="one device"):
        ops.hybrid_loss(torch.randn(2, 1, 4, 4, device="cuda"), torch.rand(2, 1, 4, 4))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(16, 1, 256, 256), (3, 1, 37, 29), (1, 1, 513, 1023)])
def test_cuda_triton_matches_reference(dtype, shape):
    # full-size images: real alignments, many chunks per image, grid limits
    logits, target = _inputs(shape, torch.float64, soft=False, device="cuda")
    if dtype in (torch.float32, torch.float64):
        triton_cuda = Case("triton", torch.device("cuda"))
        _assert_matches_reference(triton_cuda, logits.to(dtype), target.to(dtype), pos_weight=2.0)
        _assert_matches_reference(triton_cuda, logits.to(dtype).to(memory_format=torch.channels_last),
                                  target.to(dtype), per_image=False)
        return
    lo = (logits.to(dtype), target.to(dtype))
    exact = _loss_and_grads(reference.hybrid_loss, logits, target)
    ref_lo = _loss_and_grads(reference.hybrid_loss, *lo)
    fast_lo = _loss_and_grads(lib.hybrid_loss_triton, *lo)
    for f, r, e in zip(fast_lo, ref_lo, exact):
        assert _max_err(f, e) <= 2 * _max_err(r, e) + 1e-6 * e.abs().max().item()
