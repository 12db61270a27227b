"""Which fast backends the suite tests, each on the device it serves on this machine.

On a CUDA machine the Triton cases run the compiled kernels on CUDA tensors; without one
they run through the interpreter on CPU tensors (conftest sets TRITON_INTERPRET). The C++
cases run on CPU tensors wherever the extension is built. A case that cannot run here is
skipped with the reason dispatch gives.
"""
from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from r2unet_fast.ops.dispatch import available_backends

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST_BACKENDS: tuple[str, ...] = ("cpu", "triton")


class Case(NamedTuple):
    """A fast backend and the device of the tensors it runs on."""
    name: str
    device: torch.device


def device_of(backend: str) -> torch.device:
    """The device ``backend``'s tests put their tensors on."""
    return torch.device(TRITON_DEVICE if backend == "triton" else "cpu")


def case(backend: str, op: str | None = None):
    """One pytest.param of :class:`Case`, skipped with dispatch's reason where it cannot run."""
    device = device_of(backend)
    reason = available_backends(op, device)[backend]
    return pytest.param(Case(backend, device), id=f"{backend}-{device.type}",
                        marks=pytest.mark.skipif(reason is not None, reason=f"{backend} on {device.type}: {reason}"))


def cases(op: str | None = None, backends: tuple[str, ...] = FAST_BACKENDS) -> list:
    """:func:`case` for each of ``backends``."""
    return [case(b, op) for b in backends]
