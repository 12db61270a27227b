"""gpu_report.py's recurrent-conv section: the RRCU block on the Triton passes against the float64
reference on CUDA (every t, tied/untied, shared/per-step norms; fp32 and the bf16 ratio rule), then
timings at each level of R2AttUNet(base 64, t=2), batch 16 at 256x256: forward and forward+backward,
fp32 and bf16 autocast, eager / fast / torch.compile(eager), achieved TFLOP/s of the convolutions
against the measured bf16 matmul peak, peak memory and saved-for-backward bytes."""
from __future__ import annotations

import copy
import itertools

import torch

from benchmarks.steps import PASSES, module_step, saved_for_backward_bytes
from benchmarks.test_recurrent_conv import GPU_LEVELS, block_and_input
from r2unet_fast.nn.blocks import RRCUBlock
from r2unet_fast.ops.triton import conv3x3

CONVS = ("triton", "aten")
# "fast": each convolution on what first use measured faster; "fast_<conv>": all forced to one
IMPLS = ("eager", "fast", "fast_triton", "fast_aten", "compile")


def _switch(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return model


def _grads(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    leaf = x.detach().clone().requires_grad_()
    model.train()
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(leaf)
    gen = torch.Generator(device=x.device).manual_seed(1)
    (out.float() * torch.randn(out.shape, generator=gen, device=x.device)).sum().backward()
    return [out.detach().double(), leaf.grad.double()] + [p.grad.double() for p in model.parameters()
                                                          if p.grad is not None] + \
        [b.double() for b in model.buffers() if b.is_floating_point()]


def check(ctx) -> tuple[int, list[str]]:
    """Triton RRCU blocks against the float64 reference: (checks made, one line per mismatch)."""
    failures, checks = [], 0
    configs = [(1, False, False)] if ctx.smoke else itertools.product([0, 1, 2, 3], [False, True], [False, True])
    for t, tied, shared in configs:
        torch.manual_seed(t)
        base = RRCUBlock(5, 6, t, tied=tied, shared_norm=shared)
        x = torch.randn(2, 5, 13, 9).to(ctx.device).contiguous(memory_format=torch.channels_last)
        exact = _grads(_switch(copy.deepcopy(base), "reference").to(ctx.device).double(), x.double(), torch.float32)
        for dtype in (torch.float32,) if ctx.smoke else (torch.float32, torch.bfloat16):
            ref = _grads(_switch(copy.deepcopy(base), "reference").to(ctx.device), x, dtype)
            # the implicit-GEMM step and the cuDNN one, whatever first use would pick (--cpu-smoke: the
            # interpreter's kernel only; the suite runs the unit on both)
            for conv in CONVS[:1] if ctx.smoke else CONVS:
                where = f"t={t} tied={tied} shared={shared} {dtype} conv={conv}"
                try:
                    with conv3x3.forced(conv):
                        fast = _grads(_switch(copy.deepcopy(base), "triton").to(ctx.device), x, dtype)
                except Exception as e:  # a kernel that does not compile is one failure, not the end of the call
                    failures.append(f"recurrent_conv {where}: {type(e).__name__}: {str(e)[:400]}")
                    continue
                for i, (f, r, e) in enumerate(zip(fast, ref, exact)):
                    checks += 1
                    scale = max(e.abs().max().item(), 1.0)
                    # fp32: cuDNN's convolutions may use TF32 on the reference's side; bf16: the ratio rule
                    bound = 5e-3 * scale if dtype == torch.float32 else 2 * (r - e).abs().max().item() + 1e-2 * scale
                    err = (f - e).abs().max().item() if dtype != torch.float32 else (f - r).abs().max().item()
                    if not (err <= bound and torch.isfinite(f).all()):
                        failures.append(f"recurrent_conv tensor #{i} {where}: err {err:.3g} > {bound:.3g}")
    return checks, failures


def matmul_peak_tflops(ctx) -> float:
    """Achieved bf16 TFLOP/s of a large matmul: the ceiling the convolutions are measured against."""
    a = torch.randn(8192, 8192, device=ctx.device, dtype=torch.bfloat16)
    ms = ctx.bench_ms(lambda: a @ a)
    return 2 * 8192 ** 3 / (ms * 1e-3) / 1e12


def block_flops(n: int, c: int, size: int, t: int = 2) -> int:
    """Multiply-adds x 2 of the block's convolutions (forward): conv1x1 + 2 units of (1 + t) 3x3 convs."""
    pixels = n * size * size
    return 2 * pixels * c * c * (1 + 2 * (1 + t) * 9)


def section_recurrent_conv(ctx) -> dict:
    """Checks, then eager / fast / torch.compile(eager) per level, dtype and pass."""
    from benchmarks.gpu_report import Timing, launches_per_call, peak_added_mb

    checks, failures = check(ctx)
    ctx.report_checks("recurrent_conv", checks, failures)
    ctx.start_timings()
    peak = None if ctx.smoke else matmul_peak_tflops(ctx)
    levels = [(2, 8, 16)] if ctx.smoke else GPU_LEVELS
    timings = []
    # --cpu-smoke runs the Triton passes through the interpreter: one dtype keeps it to seconds
    for n, c, size in levels:
        for dtype in (torch.float32,) if ctx.smoke else (torch.float32, torch.bfloat16):
            for pass_ in PASSES[1:] if ctx.smoke else PASSES:
                flops = block_flops(n, c, size) * (1 if pass_ == "fwd" else 3)
                row = Timing("recurrent_conv", pass_, str(dtype).replace("torch.", ""), [n, c, size, size], 0)
                for impl in IMPLS if not ctx.smoke else ("eager", "fast", "compile"):
                    backend = "triton" if impl.startswith("fast") else "reference"  # the interpreter's in --cpu-smoke
                    forced = impl.split("_")[1] if impl.startswith("fast_") else None
                    try:
                        block, x = block_and_input(n, c, size, ctx.device, dtype, backend)
                        model = torch.compile(block) if impl == "compile" else block
                        if impl == "compile" and ctx.smoke:
                            raise RuntimeError("skipped in --cpu-smoke")
                        step = _forced_step(module_step(model, x, pass_), forced)
                        row.ms[impl] = ctx.bench_ms(step)
                        row.peak_mb[impl] = peak_added_mb(step, ctx.device)
                        row.launches[impl] = launches_per_call(step, ctx.device)
                        tflops = flops / (row.ms[impl] * 1e-3) / 1e12
                        note = f"{tflops:.1f} TFLOP/s" + (f" ({100 * tflops / peak:.0f}% of bf16 matmul)" if peak else "")
                        if pass_ == "fwd+bwd":
                            def forward() -> torch.Tensor:
                                with torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype != torch.float32):
                                    return model(x)
                            saved = saved_for_backward_bytes(forward, (x, *block.parameters()))
                            note += f", saved for backward {saved / 2**20:.1f} MiB"
                        row.notes[impl] = note
                    except Exception as e:  # compile may fail; keep the others' numbers
                        row.ms[impl], row.notes[impl] = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                timings.append(row)
                ctx.emit(row)
    # what first use measured, in the form conv3x3.CONV_CHOICES takes (committed from here)
    choices = {repr(key): impl for key, impl in conv3x3.measured_choices().items()}
    return {"name": "recurrent_conv", "checks_passed": not failures, "check_failures": failures,
            "timings": timings, "bf16_matmul_tflops": peak, "conv3x3_choices": choices}


def _forced_step(step, conv: str | None):
    """``step`` with every 3x3 convolution of the Triton backend on ``conv`` (None: as chosen)."""
    if conv is None:
        return step

    def forced() -> object:
        with conv3x3.forced(conv):
            return step()
    return forced
