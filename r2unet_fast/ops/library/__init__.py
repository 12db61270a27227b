"""The fused ops as ``torch.library`` operators: ``r2unet_fast::<op>_<backend>`` and ``..._bwd``.

One module per op (:mod:`.hybrid_loss`). Each registers, per backend, a forward and a
backward operator over that backend's launchers, with a fake (meta) implementation and
an autograd formula, so ``torch.compile(fullgraph=True)`` traces through them and CUDA
graphs capture them. Registration imports triton or the C++ extension, so it happens on
first use (:func:`define` is called by the op module's ``register``), never on import.
docs/kernels.md walks through the layers.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Callable

import torch

NAMESPACE = "r2unet_fast"
_DEVICE_TYPES: dict[str, str | None] = {"cpu": "cpu", "triton": None}


def interpreting() -> bool:
    """Whether Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def define(name: str, backend: str, fn: Callable, fake: Callable):
    """Register ``fn`` as ``r2unet_fast::<name>`` and return the op (a ``CustomOpDef``).

    Triton launchers become a ``triton_op``: torch.compile sees the kernels inside (the
    launcher itself, run on fake tensors, is the fake implementation). Under the interpreter
    the kernels are plain Python, which fake tensors cannot run, and C++ is opaque anyway:
    both become a ``custom_op`` with ``fake``. ``fn``'s annotations give the schema.
    """
    qualname = f"{NAMESPACE}::{name}"
    if backend == "triton" and not interpreting():
        return torch.library.triton_op(qualname, fn, mutates_args=())
    op = torch.library.custom_op(qualname, fn, mutates_args=(), device_types=_DEVICE_TYPES[backend])
    op.register_fake(fake)
    return op


def define_with_autograd(name: str, backend: str, fwd: Callable, fake_fwd: Callable, bwd: Callable,
                         fake_bwd: Callable, backward: Callable[[Callable], Callable], setup_context: Callable):
    """Define ``r2unet_fast::<name>`` and ``..._bwd`` (:func:`define`) and connect them for autograd:
    ``backward(bwd_op)`` returns the forward op's backward formula. Returns the forward op."""
    fwd_op = define(name, backend, fwd, fake_fwd)
    bwd_op = define(f"{name}_bwd", backend, bwd, fake_bwd)
    fwd_op.register_autograd(backward(bwd_op), setup_context=setup_context)
    return fwd_op


def profiled(name: str) -> contextlib.AbstractContextManager:
    """A profiler range named as the op ``r2unet_fast::<name>``, for an eager path that calls the op's
    implementation without the dispatcher, so profiles (and the tests that read them) still show
    the op; nothing while no profiler runs."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(f"{NAMESPACE}::{name}")
    return contextlib.nullcontext()


@torch.compiler.assume_constant_result
def ready(op: str, backend: str) -> bool:
    """Register ``op``'s operators for ``backend`` on first use (its module's ``register``).

    Strings in, a constant out: dynamo runs it once while tracing and keeps True, so the import
    of triton or the C++ extension and the registration never reach the graph.
    """
    importlib.import_module(f"{__name__}.{op}").register(backend)
    return True


def dense_layout(t: torch.Tensor) -> torch.memory_format:
    """A memory format ``t`` already has that keeps each image one dense block: channels_last when
    ``t`` is 4-D, channels_last and not also plainly contiguous; else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
