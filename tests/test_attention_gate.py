"""The fused attention gate through ``ops.attention_gate`` against the reference, on every fast
backend on the device it serves (``cpu-cpu``, ``triton-cpu`` through the interpreter,
``triton-cuda`` on a GPU): gradcheck, parity of out, psi and all nine gradients at odd sizes
and both layouts, poisoned outputs, NaN, the bf16/fp16 ratio rule, autocast, registration
(opcheck), torch.compile without graph breaks, and bad input.
"""
from __future__ import annotations


import pytest
import torch
from backend_cases import cases
from poison import poisoned_allocations

from r2unet_fast import ops
from r2unet_fast.ops import reference
from r2unet_fast.ops.library import attention_gate as lib

BACKENDS = cases("attention_gate")
CPU_ONLY = cases("attention_gate", ("cpu",))
NAMES = ("out", "psi", "x", "g", "w_x", "w_g", "bias", "w_psi", "b_psi")
# relative to the largest expected magnitude; compiled CUDA exp is a few ulp off libm
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _inputs(n=2, cx=5, cg=7, f=3, h=13, w=9, dtype=torch.float64, device="cpu", channels_last=False):
    """x, g and the five weights, drawn in float64 on the CPU (same numbers on every device)."""
    x, g = torch.randn(n, cx, h, w, dtype=torch.float64), torch.randn(n, cg, h, w, dtype=torch.float64)
    weights = [torch.randn(f, cx, dtype=torch.float64) / cx ** 0.5, torch.randn(f, cg, dtype=torch.float64) / cg ** 0.5,
               torch.randn(f, dtype=torch.float64) * 0.3, torch.randn(f, dtype=torch.float64),
               torch.randn(1, dtype=torch.float64)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, g = (t.to(device, dtype).contiguous(memory_format=fmt) for t in (x, g))
    return x, g, [wt.to(device, dtype) for wt in weights]


def _outputs_and_grads(fn, x, g, weights, psi_grad=True, seed=3):
    """out, psi and the gradients of x, g and the weights for a random linear loss on out (and psi)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, g, *weights)]
    out, psi = fn(*leaves, return_psi=True)
    gen = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)).sum()
    if psi_grad:
        loss = loss + (psi * torch.randn(psi.shape, generator=gen, dtype=torch.float64).to(psi.device, psi.dtype)).sum()
    loss.backward()
    return [out.detach(), psi.detach()] + [t.grad for t in leaves]


def _fast(backend):
    return lambda *args, **kw: ops.attention_gate(*args, backend=backend.name, **kw)


def _assert_close(got, want, tol, names=NAMES):
    for name, a, b in zip(names, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        scale = b.abs().max().item() or 1.0
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    x, g, weights = _inputs(n=1, cx=3, cg=4, f=2, h=3, w=4, device=backend.device)
    leaves = [t.requires_grad_() for t in (x, g, *weights)]
    assert torch.autograd.gradcheck(lambda *a: _fast(backend)(*a, return_psi=True), leaves)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("psi_grad", [True, False], ids=["psi_grad", "out_only"])
def test_matches_reference(backend, dtype, channels_last, psi_grad):
    x, g, weights = _inputs(dtype=dtype, device=backend.device, channels_last=channels_last)
    got = _outputs_and_grads(_fast(backend), x, g, weights, psi_grad)
    want = _outputs_and_grads(reference.attention_gate, x, g, weights, psi_grad)
    _assert_close(got, want, TOL[dtype])
    assert got[0].stride() == x.stride() and got[2].stride() == x.stride() and got[3].stride() == g.stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_wider_than_one_tile(backend):
    x, g, weights = _inputs(n=1, cx=40, cg=20, f=24, h=5, w=7, device=backend.device)
    _assert_close(_outputs_and_grads(_fast(backend), x, g, weights),
                  _outputs_and_grads(reference.attention_gate, x, g, weights), TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_layouts_and_views(backend):
    x, g, weights = _inputs(n=3, device=backend.device)
    views = (x[1:].to(memory_format=torch.channels_last), g[1:].transpose(2, 3).contiguous().transpose(2, 3))
    weights = [weights[0].t().contiguous().t(), *weights[1:]]  # non-contiguous weight
    _assert_close(_outputs_and_grads(_fast(backend), *views, weights),
                  _outputs_and_grads(reference.attention_gate, *views, weights), TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_buffers_are_fully_written(backend, monkeypatch):
    x, g, weights = _inputs(n=2, cx=6, cg=3, f=5, h=11, w=7, dtype=torch.float32, device=backend.device)
    with poisoned_allocations(monkeypatch):
        got = _outputs_and_grads(_fast(backend), x, g, weights)
    _assert_close(got, _outputs_and_grads(reference.attention_gate, x, g, weights), TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["x", "g", "w_x"])
def test_nan_propagates_like_the_reference(backend, where):
    x, g, weights = _inputs(device=backend.device)
    target = {"x": x, "g": g, "w_x": weights[0]}[where]
    target.view(-1)[3] = float("nan")
    got = _outputs_and_grads(_fast(backend), x, g, weights)
    want = _outputs_and_grads(reference.attention_gate, x, g, weights)
    for name, a, b in zip(NAMES, got, want):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, equal_nan=True, msg=lambda m: f"{name}: {m}")


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_ratio_rule(backend, dtype):
    # error(fast vs float64) <= 2 x error(reference in dtype vs float64) + 2 ulp of the largest value.
    # "float64" runs on the rounded inputs: rounding x near a relu kink is not the kernel's error.
    # The ulp floor: a sum the half reference happens to get right by cancellation would otherwise
    # hold the fast path to a bound far below its dtype's resolution.
    x, g, weights = _inputs(n=2, cx=9, cg=6, f=5, h=7, w=5, device=backend.device)
    lo = (x.to(dtype), g.to(dtype), [w.to(dtype) for w in weights])
    exact = _outputs_and_grads(reference.attention_gate, lo[0].double(), lo[1].double(), [w.double() for w in lo[2]])
    ref_lo = _outputs_and_grads(reference.attention_gate, *lo)
    fast_lo = _outputs_and_grads(_fast(backend), *lo)
    eps = torch.finfo(dtype).eps
    for name, f, r, e in zip(NAMES, fast_lo, ref_lo, exact):
        assert f.dtype == r.dtype, name
        assert _max_err(f, e) <= 2 * _max_err(r, e) + 2 * eps * e.abs().max().item(), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_autocast_weights_stay_float32(backend):
    x, g, weights = _inputs(dtype=torch.float32, device=backend.device)
    results = []
    for fn in (_fast(backend), reference.attention_gate):
        leaves = [t.detach().clone().requires_grad_() for t in weights]
        with torch.autocast(backend.device.type, dtype=torch.bfloat16):
            out = fn(x.bfloat16(), g.bfloat16(), *leaves)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        assert all(t.grad.dtype == torch.float32 for t in leaves)
        results.append([out.float()] + [t.grad for t in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * b.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_pass_opcheck(backend):
    lib.register(backend.name)
    namespace = torch.ops.r2unet_fast
    fwd = getattr(namespace, lib.op_name(backend.name))
    bwd = getattr(namespace, lib.op_name(backend.name, backward=True))
    x, g, weights = _inputs(n=1, cx=3, cg=2, f=2, h=3, w=5, device=backend.device)
    torch.library.opcheck(fwd.default, tuple(t.clone().requires_grad_() for t in (x, g, *weights)))
    kept = fwd(x, g, *weights)[2:]  # the C++ forward keeps the pre-activation for its backward
    grad_out = torch.randn_like(x)
    for grad_psi in (torch.randn(1, 1, 3, 5, dtype=x.dtype, device=x.device), x.new_empty(0)):
        torch.library.opcheck(bwd.default, (x, g, *weights, *kept, grad_out, grad_psi))


@pytest.mark.parametrize("backend", CPU_ONLY)
def test_module_compiles_without_graph_breaks(backend):
    from r2unet_fast.nn import AttentionGate

    gate = AttentionGate(6, 4, 3, backend=backend.name)
    x, g = torch.randn(2, 6, 8, 10), torch.randn(2, 4, 8, 10)

    def step(x, g):
        out, psi = gate(x, g, return_psi=True)
        return out.square().mean() + psi.mean()

    try:
        compiled = torch.compile(step, fullgraph=True)
        got = compiled(x, g)
    except Exception as error:  # inductor's CPU code needs a C++ compiler: say so rather than fail
        if "compiler" in str(error).lower() and "cpp" in str(error).lower():
            pytest.skip(f"inductor cannot compile here: {str(error).splitlines()[0][:200]}")
        raise
    torch.testing.assert_close(got, step(x, g), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "reference"] + [p.values[0].name for p in BACKENDS])
@pytest.mark.parametrize("bad", ["mixed_dtypes", "no_channels", "g_size", "w_psi_shape", "int_x", "empty"])
def test_bad_input_raises_a_clear_error(backend, bad):
    x, g, weights = _inputs(dtype=torch.float32)
    if bad == "mixed_dtypes":
        g, match = g.double(), "one dtype"
    elif bad == "no_channels":
        weights = [weights[0][:0], weights[1][:0], weights[2][:0], weights[3][:0], weights[4]]
        match = "at least one intermediate channel"
    elif bad == "g_size":
        g, match = g[:, :, :-1], "spatial size"
    elif bad == "w_psi_shape":
        weights[3], match = weights[3][:-1], "w_psi"
    elif bad == "int_x":
        x, match = x.long(), "floating-point"
    else:
        x, g, match = x[:0], g[:0], "non-empty"
    with pytest.raises(ValueError, match=match):
        ops.attention_gate(x, g, *weights, backend=backend)
