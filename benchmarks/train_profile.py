"""Where a training step's time goes: phase times and the top ops, through the real Trainer.

Used by ``benchmarks/gpu_train.py`` in its own process, after the throughput runs. Batches are
loaded before timing, so the numbers are the step alone: ``Trainer.train_step`` with its phases
``to_device``, ``forward``, ``loss``, ``backward``, ``optimizer`` (clipping, the finite check, the
step), timed between CUDA events (device ms: GPU idle gaps inside a phase count) and by the host
clock (host ms: the Python thread's time; the optimizer phase includes waiting for the GPU at the
finite check, which syncs every step), then a few steps under torch.profiler.
"""
from __future__ import annotations

import contextlib
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

# The trainer's own phase labels; kept out of the op ranking so they do not count twice.
PHASE_PREFIX = "step."


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in this (main) thread after ``seconds``."""
    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"stopped after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _stamp(device: torch.device) -> tuple[torch.cuda.Event | None, float]:
    event = None
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
    return event, time.perf_counter()


def _timing_trainer() -> type:
    from r2unet_fast.train import Trainer

    class PhaseTimer(Trainer):
        """A Trainer whose ``phase`` hook also records (name, start, end) stamps while ``marks`` is a list."""

        marks: list | None = None

        @contextlib.contextmanager
        def phase(self, name: str) -> Iterator[None]:
            with super().phase(name):
                if self.marks is None:
                    yield
                    return
                begin = _stamp(self.device)
                yield
                self.marks.append((name, begin, _stamp(self.device)))

    return PhaseTimer


def _phase_summary(marks: list, steps: int) -> dict[str, dict[str, float | None]]:
    """Mean device and host milliseconds per step of each phase (device None on CPU)."""
    totals: dict[str, dict[str, float | None]] = {}
    for name, (event0, host0), (event1, host1) in marks:
        total = totals.setdefault(name, {"device_ms": None if event0 is None else 0.0, "host_ms": 0.0})
        if event0 is not None:
            total["device_ms"] += event0.elapsed_time(event1)
        total["host_ms"] += (host1 - host0) * 1e3
    return {name: {key: None if value is None else value / steps for key, value in total.items()}
            for name, total in totals.items()}


def _ranked(events: list[Any], attribute: str, steps: int, total_us: float, count: int) -> list[dict[str, Any]]:
    ranked = sorted(events, key=lambda e: getattr(e, attribute), reverse=True)[:count]
    return [{"name": e.key, "calls_per_step": e.count / steps, "self_ms_per_step": getattr(e, attribute) / 1e3 / steps,
             "share": getattr(e, attribute) / total_us if total_us else 0.0}
            for e in ranked if getattr(e, attribute) > 0]


def _top(prof: Any, device: torch.device, steps: int, count: int) -> dict[str, Any]:
    """Where the time went per step. On CUDA: the device total (kernels, copies, memsets), the ``count``
    kernels with the most of it, and the ``count`` ops (aten, autograd, optimizer) whose own launches
    took the most of it. On CPU: the ops with the most self CPU time."""
    from torch.autograd import DeviceType

    averages = [e for e in prof.key_averages() if not e.key.startswith((PHASE_PREFIX, "ProfilerStep"))]
    if device.type != "cuda":
        total = sum(e.self_cpu_time_total for e in averages)
        return {"clock": "cpu", "total_ms_per_step": total / 1e3 / steps, "kernels": [],
                "ops": _ranked(averages, "self_cpu_time_total", steps, total, count)}
    attribute = "self_device_time_total"  # torch >= 2.4 (self_cuda_time_total before)
    kernels = [e for e in averages
               if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    ops = [e for e in averages if e.device_type == DeviceType.CPU]
    total = sum(getattr(e, attribute) for e in kernels)
    return {"clock": "device", "total_ms_per_step": total / 1e3 / steps,
            "kernels": _ranked(kernels, attribute, steps, total, count),
            "ops": _ranked(ops, attribute, steps, total, count)}


def profile_training_steps(config: Any, *, warmup: int = 5, timed: int = 10, profiled: int = 5,
                           top: int = 25, text_path: Path | None = None) -> dict[str, Any]:
    """Phase times over ``timed`` steps and the ``top`` ops of ``profiled`` steps under torch.profiler,
    after ``warmup`` steps (cuDNN autotuning, Triton compilation), for the run ``config`` describes
    (a TrainConfig). Writes the profiler table and the phase summary to ``text_path`` when given."""
    from torch.profiler import ProfilerActivity, profile

    from r2unet_fast.train import setup_distributed
    from r2unet_fast.train.runtime import deterministic_algorithms

    dist = setup_distributed(config.device)
    device = dist.device
    with tempfile.TemporaryDirectory(prefix="train-profile-") as folder:
        trainer = _timing_trainer()(config, dist, Path(folder))
        batches = [batch for _, batch in zip(range(4), trainer.train_loader)]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        step = 0

        def run(count: int) -> None:
            nonlocal step
            for _ in range(count):
                trainer.train_step(batches[step % len(batches)], 0, step)
                step += 1
            sync()

        with deterministic_algorithms(device):  # the training loop's cuDNN settings
            trainer.net.train()
            run(warmup)
            trainer.marks = []
            started = time.perf_counter()
            run(timed)
            step_ms = (time.perf_counter() - started) * 1e3 / timed
            phases = _phase_summary(trainer.marks, timed)
            trainer.marks = None
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                run(profiled)
        trainer.log.close()
    result = {"device": str(device), "batch_size": config.batch_size, "amp": config.amp, "backend": config.backend,
              "warmup_steps": warmup, "timed_steps": timed, "profiled_steps": profiled, "step_ms": step_ms,
              "images_per_s": config.batch_size * 1e3 / step_ms, "phases": phases, **_top(prof, device, profiled, top)}
    if text_path is not None:
        sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        text_path.write_text(phase_text(result) + "\n\n" + prof.key_averages().table(sort_by=sort_by, row_limit=top)
                             + "\n")
    return result


def phase_text(result: dict[str, Any], top: int | None = None) -> str:
    """Plain-text summary of :func:`profile_training_steps`'s result: phases, then the first ``top`` (all)
    ops and kernels."""
    lines = [f"{result['device']}, batch {result['batch_size']}, amp {result['amp']}, backend {result['backend']}: "
             f"{result['step_ms']:.1f} ms per step ({result['images_per_s']:.1f} images/s) over "
             f"{result['timed_steps']} steps after {result['warmup_steps']} warm-up steps",
             f"{'phase':<12}{'device ms':>11}{'host ms':>10}{'share':>8}"]
    device_total = sum(p["device_ms"] or 0.0 for p in result["phases"].values())
    for name, p in result["phases"].items():
        share = f"{p['device_ms'] / device_total:.0%}" if p["device_ms"] is not None and device_total else "-"
        device_ms = "-" if p["device_ms"] is None else f"{p['device_ms']:.2f}"
        lines.append(f"{name:<12}{device_ms:>11}{p['host_ms']:>10.2f}{share:>8}")
    for key in ("ops", "kernels"):
        if result[key]:
            lines.append(f"top {key} by self {result['clock']} time (ms per step, of "
                         f"{result['total_ms_per_step']:.1f}):")
            lines += [f"  {o['self_ms_per_step']:9.3f}  {o['share']:6.1%}  {o['calls_per_step']:6.1f} calls  "
                      f"{o['name'][:100]}" for o in result[key][:top]]
    return "\n".join(lines)

