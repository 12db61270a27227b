"""Backend choice for every fused op, with reasons when a backend does not apply.

``"auto"`` resolves per tensor device: Triton for CUDA tensors, the C++
extension for CPU tensors, the pure-PyTorch reference where neither has a
kernel for the op. An explicitly requested backend that cannot run raises a
ValueError carrying the reason, never a silent fallback.

:func:`kernel` runs inside ``torch.compile``d code, so it is traceable: the
one step dynamo cannot follow (importing triton, or loading and perhaps
compiling the C++ extension, to see whether they work) sits in
:func:`_reason`, which dynamo calls while tracing and keeps as a constant.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from . import extension, reference
from .library import attention_gate as _attention_gate_ops
from .library import hybrid_loss as _hybrid_loss_ops
from .library import recurrent_conv as _recurrent_conv_ops
from .library import interpreting

BACKENDS: tuple[str, ...] = ("reference", "triton", "cpu")
BACKEND_CHOICES: tuple[str, ...] = ("auto",) + BACKENDS
_AUTO: dict[str, str] = {"cuda": "triton", "cpu": "cpu"}

# op -> backend -> implementation with the reference's signature. None of them imports
# triton or the extension before it runs, so importing the package never does.
_KERNELS: dict[str, dict[str, Callable]] = {
    "hybrid_loss": {"reference": reference.hybrid_loss,
                    "triton": _hybrid_loss_ops.hybrid_loss_triton,
                    "cpu": _hybrid_loss_ops.hybrid_loss_cpu},
    "attention_gate": {"reference": reference.attention_gate,
                       "triton": _attention_gate_ops.attention_gate_triton,
                       "cpu": _attention_gate_ops.attention_gate_cpu},
    "recurrent_conv": {"reference": reference.recurrent_conv,
                       "triton": _recurrent_conv_ops.recurrent_conv_triton,
                       "cpu": _recurrent_conv_ops.recurrent_conv_cpu},
}


def check_backend_name(name: str) -> str:
    """Return ``name`` if it is one of :data:`BACKEND_CHOICES`, else raise ValueError."""
    if name not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    return name


@functools.lru_cache(maxsize=None)
def _triton_import_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e}); pip install 'r2unet_fast[triton]'"
    return None


def _triton_reason(device: torch.device | None) -> str | None:
    reason = _triton_import_reason()
    if reason is not None:
        return reason
    if device is None:
        if torch.cuda.is_available() or interpreting():
            return None
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run its kernels on CPU tensors)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"


@functools.lru_cache(maxsize=None)
def _cpu_import_reason() -> str | None:
    # The first call may compile the kernels (a plain `pip install .` ships only their
    # sources); ops/extension.py decides between that and the prebuilt module.
    return extension.unavailable_reason()


def _cpu_reason(device: torch.device | None) -> str | None:
    reason = _cpu_import_reason()
    if reason is None and device is not None and device.type != "cpu":
        reason = f"the cpu backend needs CPU tensors, got {device.type}"
    return reason


def _backend_reason(backend: str, op: str | None, device: torch.device | None) -> str | None:
    # A backend that cannot run at all says so before saying it lacks this op.
    reason = {"triton": _triton_reason, "cpu": _cpu_reason}.get(backend, lambda _: None)(device)
    if reason is None and op is not None and backend not in _KERNELS[op]:
        reason = f"{op} has no {backend} kernel"
    return reason


@torch.compiler.assume_constant_result
def _reason(backend: str, op: str | None, device_type: str | None) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device_type`` tensors, or None. Strings in and
    out, so that dynamo can call it while tracing and keep the answer as a constant."""
    return _backend_reason(backend, op, None if device_type is None else torch.device(device_type))


def available_backends(op: str | None = None, device: torch.device | str | None = None) -> dict[str, str | None]:
    """Map each backend to ``None`` (usable) or the reason it is unavailable.

    Args:
        op: restrict the report to one op (e.g. ``"hybrid_loss"``), which also
            reports backends that have no kernel for that op.
        device: restrict the report to tensors on this device.
    """
    if op is not None and op not in _KERNELS:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(sorted(_KERNELS))}")
    dev = torch.device(device).type if device is not None else None
    return {b: _reason(b, op, dev) for b in BACKENDS}


def has_kernel(op: str, backend: str) -> bool:
    """Whether ``op`` has an implementation for ``backend`` ("auto" always does)."""
    return backend == "auto" or backend in _KERNELS[op]


def ensure_available(backend: str) -> str:
    """Raise ValueError with the reason if ``backend`` cannot run at all; return it."""
    check_backend_name(backend)
    if backend != "auto":
        reason = _reason(backend, None, None)
        if reason is not None:
            raise ValueError(f"backend {backend!r} is unavailable: {reason}")
    return backend


def resolve(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend that runs ``op`` on tensors of ``device``."""
    check_backend_name(backend)
    if backend == "auto":
        preferred = _AUTO.get(device.type)
        if preferred is not None and _reason(preferred, op, device.type) is None:
            return preferred
        return "reference"
    reason = _reason(backend, op, device.type)
    if reason is not None:
        raise ValueError(f"backend {backend!r} is unavailable for {op}: {reason}")
    return backend


def kernel(op: str, backend: str, device: torch.device) -> Callable:
    """The implementation of ``op`` chosen for ``backend`` and ``device``."""
    return _KERNELS[op][resolve(op, backend, device)]
