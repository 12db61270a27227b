"""gpu_report.py's train_step section: the whole R2AttUNet training step (forward, hybrid loss,
backward, Adam) on the fast model against the float64 reference (a small model: loss and every
gradient, fp32 and the bf16 ratio rule), then timed at base 64, depth 5, t=2, batch 16 at 256x256
for the untied and tied layouts, fp32 and bf16 autocast: reference eager (channels_last),
torch.compile(reference), fast and torch.compile(fast), with images/s and peak memory."""
from __future__ import annotations

import torch

from benchmarks.steps import TrainStep
from benchmarks.test_train_step import GPU_SHAPES, IMPLS, StepShape, batch, train_step
from r2unet_fast import HybridLoss


def _loss_and_grads(shape: StepShape, backend: str, device: torch.device, dtype: torch.dtype,
                    double: bool) -> list[torch.Tensor]:
    module = shape.model(backend).to(device)
    x, y = batch(shape, device)
    if double:
        module, x, y = module.double(), x.double(), y.double()
    step = TrainStep(module, module, HybridLoss(backend=backend), x, y, dtype)
    loss = step.loss()
    loss.backward()
    return [loss.detach().double()] + [p.grad.double() for p in module.parameters()]


def check(ctx) -> tuple[int, list[str]]:
    """The fast model's loss and parameter gradients against the float64 reference: (checks, failures)."""
    failures, checks = [], 0
    shapes = [StepShape("untied", 2, 2, 1, 8, False)] if ctx.smoke else \
        [StepShape("untied", 8, 4, 2, 64, False), StepShape("tied", 8, 4, 2, 64, True)]
    for shape in shapes:
        exact = _loss_and_grads(shape, "reference", ctx.device, torch.float64, double=True)
        for dtype in (torch.float32,) if ctx.smoke else (torch.float32, torch.bfloat16):
            ref = _loss_and_grads(shape, "reference", ctx.device, dtype, double=False)
            try:
                fast = _loss_and_grads(shape, "triton", ctx.device, dtype, double=False)
            except Exception as e:  # one failure, not the end of the call
                failures.append(f"train_step {shape.name} {dtype}: {type(e).__name__}: {str(e)[:400]}")
                continue
            for i, (f, r, e) in enumerate(zip(fast, ref, exact)):
                checks += 1
                scale = max(e.abs().max().item(), 1e-3)
                # the ratio rule: no further from float64 than twice the reference in the same dtype
                bound = 2 * (r - e).abs().max().item() + (1e-4 if dtype == torch.float32 else 1e-2) * scale
                err = (f - e).abs().max().item()
                if not (err <= bound and torch.isfinite(f).all()):
                    failures.append(f"train_step {shape.name} tensor #{i} {dtype}: err {err:.3g} > {bound:.3g}")
    return checks, failures


def section_train_step(ctx) -> dict:
    """Checks, then the four implementations per layout and dtype."""
    from benchmarks.gpu_report import Timing, peak_added_mb

    checks, failures = check(ctx)
    ctx.report_checks("train_step", checks, failures)
    ctx.start_timings()
    shapes = [StepShape("untied", 2, 2, 1, 8, False)] if ctx.smoke else GPU_SHAPES
    timings = []
    for shape in shapes:
        for dtype in (torch.float32,) if ctx.smoke else (torch.float32, torch.bfloat16):
            row = Timing(f"train_step {shape.name}", "step", str(dtype).replace("torch.", ""),
                         [shape.batch, 3, shape.size, shape.size], 0)
            for impl in IMPLS:
                step = None
                key = {"reference": "eager", "compile-reference": "compile"}.get(impl, impl)
                try:
                    if impl.startswith("compile") and ctx.smoke:
                        raise RuntimeError("skipped in --cpu-smoke")
                    step = train_step(shape, impl, dtype, ctx.device, "triton")
                    if impl.startswith("compile"):
                        step.model = torch.compile(step.model)
                    row.ms[key] = ctx.bench_ms(step)
                    row.peak_mb[key] = peak_added_mb(step, ctx.device)
                    row.notes[key] = f"{shape.batch / (row.ms[key] * 1e-3):.1f} images/s"
                except Exception as e:  # compile may fail; keep the others' numbers
                    row.ms[key], row.notes[key] = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                del step
            timings.append(row)
            ctx.emit(row)
    return {"name": "train_step", "checks_passed": not failures, "check_failures": failures, "timings": timings}
