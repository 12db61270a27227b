"""pytest-benchmark helpers shared by every op's benchmark file.

Each case is timed for the reference (eager), the fast backend the device
gets (C++ on CPU, Triton on CUDA) and ``torch.compile`` of the reference,
grouped per op and pass, with the peak memory of one call in ``extra_info``.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

import pytest
import torch

from r2unet_fast.ops import dispatch

Fn = Callable[[], object]
WARMUP_SECONDS = 0.5


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fast_backend_or_skip(op: str, device: torch.device) -> str:
    """The backend ``auto`` runs for ``op`` on ``device``; skip when that is only the reference."""
    backend = dispatch.resolve(op, "auto", device)
    if backend == "reference":
        reasons = dispatch.available_backends(op, device)
        pytest.skip(f"no fast {op} backend on {device.type}: "
                    + "; ".join(f"{b}: {r}" for b, r in reasons.items() if r))
    return backend


def compiled_or_skip(fn: Callable, step: Callable[[Callable], Fn]) -> Callable:
    """``torch.compile(fn)``, checked by running ``step(compiled)()`` twice; skip with the reason if
    inductor fails here."""
    try:
        compiled = torch.compile(fn)
        run = step(compiled)
        run()
        run()
    except Exception as e:  # inductor needs a working C++/Triton toolchain; report what broke
        pytest.skip(f"torch.compile unavailable here: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return compiled


def _cpu_peak_bytes(fn: Fn) -> int:
    # Every CPU allocation and free is a "[memory]" event with a signed size;
    # their running sum in time order is the live memory the call added.
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory(fn: Fn, device: torch.device) -> dict[str, object]:
    """Peak memory one call of ``fn`` adds on top of what was allocated before, and how it was measured."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - before,
                "memory_method": "torch.cuda.max_memory_allocated minus memory_allocated before the call"}
    try:
        peak = _cpu_peak_bytes(fn)
    except (AttributeError, RuntimeError) as e:
        return {"peak_bytes": None, "memory_method": f"unavailable ({type(e).__name__}: {e})"}
    return {"peak_bytes": peak,
            "memory_method": "torch.profiler(profile_memory=True): max running sum of CPU allocations minus frees"}


def _run_case(benchmark, fn: Fn, device: torch.device, **info: object) -> None:
    def timed() -> None:
        fn()
        synchronize(device)

    # Warm up by time, not once: glibc raises its mmap threshold only after the first large
    # frees, so until then every fresh buffer page-faults and whichever case runs first looks slow.
    deadline = time.perf_counter() + WARMUP_SECONDS
    while time.perf_counter() < deadline:
        timed()
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(peak_memory(fn, device))
    benchmark.extra_info.update(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                                python=sys.version.split()[0])
    benchmark(timed)
    # other processes on the machine skew CPU timings; keep the evidence with them
    if hasattr(os, "getloadavg"):
        benchmark.extra_info["loadavg_1min_after"] = round(os.getloadavg()[0], 2)


@pytest.fixture
def device() -> torch.device:
    return bench_device()


@pytest.fixture
def bench(benchmark, device):
    """Helpers bound to this case: ``run(fn, **info)`` times ``fn`` and records peak memory and ``info``;
    ``fast_backend(op)`` and ``compiled(fn, step)`` skip with a reason when there is none."""
    class Bench:
        @staticmethod
        def run(fn: Fn, **info: object) -> None:
            _run_case(benchmark, fn, device, **info)

        fast_backend = staticmethod(lambda op: fast_backend_or_skip(op, device))
        compiled = staticmethod(compiled_or_skip)

    return Bench
