"""The fused ops as ``torch.library`` operators: ``r2unet_fast::<op>_<backend>`` and ``..._bwd``.

One module per op (:mod:`.hybrid_loss`). Each registers, per backend, a forward and a
backward operator over that backend's launchers, with a fake (meta) implementation and
an autograd formula, so ``torch.compile(fullgraph=True)`` traces through them and CUDA
graphs capture them. Registration imports triton or the C++ extension, so it happens on
first use (:func:`define` is called by the op module's ``register``), never on import.
docs/kernels.md walks through the layers.
"""
from __future__ import annotations

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
