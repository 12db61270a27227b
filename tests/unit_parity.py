"""Fast-against-reference comparisons of modules on the fused ``recurrent_conv`` op (imported by
test_recurrent_conv.py and test_conv_units.py): a reference module and its copy on a fast backend,
a few training steps that collect every output, gradient and buffer, and the comparison."""
from __future__ import annotations

import copy

import torch


def on_backend(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """Every submodule with a ``backend`` set to ``backend`` (no fallback, unlike ``set_backend``)."""
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return model


def pair(block: torch.nn.Module, backend,
         dtype: torch.dtype = torch.float64) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(``block`` on the reference, a deep copy on ``backend``), both on ``backend.device`` in ``dtype``."""
    ref = on_backend(block, "reference").to(backend.device, dtype)
    return ref, on_backend(copy.deepcopy(ref), backend.name)


def train_steps(model: torch.nn.Module, x: torch.Tensor, steps: int = 3, train: bool = True,
                **kwargs: torch.Tensor) -> list[torch.Tensor | None]:
    """``steps`` forward+backward passes (in training mode unless ``train=False``; ``kwargs`` go to the
    forward, e.g. a residual): last output, input grad, every parameter grad (summed over the steps)
    and every buffer."""
    model.train(train)
    leaf = x.detach().clone().requires_grad_()
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        out = model(leaf, **kwargs)
        weight = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
        (out * weight).sum().backward()
    return [out.detach(), leaf.grad] + [p.grad for p in model.parameters()] + list(model.buffers())


def randn_input(n: int = 2, c: int = 5, h: int = 7, w: int = 9, device="cpu", dtype: torch.dtype = torch.float64,
                channels_last: bool = False) -> torch.Tensor:
    """A standard-normal (N, C, H, W) input drawn in float64, contiguous or channels_last."""
    x = torch.randn(n, c, h, w, dtype=torch.float64).to(device, dtype)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def assert_all_close(got: list, want: list, tol: float) -> None:
    """Pairwise: same None-ness, dtype and shape, values within ``tol`` (relative, and absolute per unit
    of the larger of 1 and the expected tensor's largest magnitude)."""
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), i
        if a is None:
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, i
        # at least unit scale: a conv bias before a BatchNorm has exact gradient 0, and both sides
        # give rounding noise of the unit-sized terms that cancel
        scale = max(b.double().abs().max().item(), 1.0) if b.numel() else 1.0
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * scale, msg=lambda m: f"#{i}: {m}")


def bf16_autocast_steps(block: torch.nn.Module, backend, x: torch.Tensor) -> tuple[list, list, list]:
    """One training step of ``block`` on float32 ``x`` under bf16 autocast, on the reference and on
    ``backend``, and the float64 reference's step: (reference, fast, exact) results of :func:`train_steps`."""
    exact_model, _ = pair(copy.deepcopy(block), backend)
    ref, fast = pair(block, backend, torch.float32)
    exact = train_steps(exact_model, x.double(), 1)
    results = []
    for model in (ref, fast):
        with torch.autocast(backend.device.type, dtype=torch.bfloat16):
            results.append(train_steps(model, x, 1))
    return results[0], results[1], exact


def assert_bf16_ratio_rule(ref: list, fast: list, exact: list) -> None:
    """error(fast vs float64) <= 2 x error(reference under autocast vs float64) + a few bf16 ulp."""
    eps = torch.finfo(torch.bfloat16).eps
    for i, (r, f, e) in enumerate(zip(ref, fast, exact)):
        if e is None or not e.is_floating_point():
            continue
        ref_err = (r.double() - e.double()).abs().max().item()
        fast_err = (f.double() - e.double()).abs().max().item()
        assert fast_err <= 2 * ref_err + 4 * eps * e.double().abs().max().item(), (i, fast_err, ref_err)
