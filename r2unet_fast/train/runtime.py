"""Device, precision, seeding and memory helpers shared by train, evaluate and predict."""
from __future__ import annotations

import contextlib
import os
import random
import sys
from typing import ContextManager, Iterator

import numpy as np
import torch

from .config import UsageError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; explicit names are checked."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} but no CUDA device is available here; use --device cpu")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise UsageError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def check_amp(amp: str, device: torch.device) -> None:
    """fp16 needs CUDA (its loss scaling and kernels are CUDA-only in practice); bf16 runs anywhere."""
    if amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 (or leave AMP off)")


def autocast(device: torch.device, amp: str) -> ContextManager:
    """Autocast to bf16/fp16 for ``amp`` in ("bf16", "fp16"), a no-op context for "off"."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_algorithms(device: torch.device) -> Iterator[None]:
    """Deterministic kernels where they cost little, restored on exit: on CPU always; on CUDA cuDNN
    autotuning stays on, since deterministic convolution backward kernels are much slower."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive NumPy/Python seeds from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA's allocator peak; on Linux CPUs the process's peak RSS
    (VmHWM, which writing "5" to /proc/self/clear_refs resets). Without that, CPU windows never restart
    and report the process's lifetime peak: wrong for every run after the first in one process (the
    ablation trains its cells one after another)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open(_CLEAR_REFS, "w") as file:
            file.write("5")
    except OSError:  # not Linux, a kernel before 4.0, or a sandbox that forbids it: lifetime peak
        pass


def _peak_rss_kib() -> int | None:
    """VmHWM of /proc/self/status (peak RSS since the last reset) in KiB, or None where unreadable."""
    try:
        with open(_STATUS) as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak RSS on CPU, since :func:`reset_peak_memory`
    (on CPUs other than Linux: over the process's lifetime), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = _peak_rss_kib()
    if kib is not None:
        return kib / 2**10
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def default_workers(device: torch.device, local_world_size: int) -> int:
    """DataLoader workers when not given: none on CPU (they would compete with the compute threads
    for the same cores), up to 8 per GPU process on CUDA."""
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, local_world_size) - 1))
