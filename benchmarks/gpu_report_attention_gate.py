"""gpu_report.py's attention-gate section: the compiled Triton gate against the reference on
CUDA, then timings at R2AttUNet(base 64)'s decoder levels (batch 16, 256x256 input), with the
bytes each implementation saves for backward beyond its inputs."""
from __future__ import annotations

from typing import Callable

import torch

from benchmarks.steps import PASSES, gate_call, gate_step, saved_for_backward_bytes
from benchmarks.test_attention_gate import GPU_LEVELS, gate_inputs

NAMES = ("out", "psi", "x", "g", "w_x", "w_g", "bias", "w_psi", "b_psi")


def _outputs_and_grads(fn: Callable, x: torch.Tensor, g: torch.Tensor, weights: list[torch.Tensor]) -> list:
    leaves = [t.detach().clone().requires_grad_() for t in (x, g, *weights)]
    out, psi = fn(*leaves, return_psi=True)
    gen = torch.Generator(device=x.device).manual_seed(1)
    go = torch.randn(out.shape, generator=gen, device=x.device).to(out.dtype)
    gp = torch.randn(psi.shape, generator=gen, device=x.device).to(psi.dtype)
    ((out * go).sum() + (psi * gp).sum()).float().backward()
    return [out.detach(), psi.detach()] + [t.grad for t in leaves]


def check(ctx, shapes: list[tuple[int, int, int, int, int, int]]) -> tuple[int, list[str]]:
    """Compare the Triton gate with the float64 reference: (checks made, one line per mismatch)."""
    from r2unet_fast.ops import reference
    from r2unet_fast.ops.library.attention_gate import attention_gate_triton

    failures, checks = [], 0
    for n, cx, cg, f, h, w in shapes:
        gen = torch.Generator().manual_seed(n * 1000 + cx)
        x = torch.randn(n, cx, h, w, generator=gen, dtype=torch.float64).to(ctx.device)
        g = torch.randn(n, cg, h, w, generator=gen, dtype=torch.float64).to(ctx.device)
        weights = [(torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(ctx.device)
                   for shape, scale in (((f, cx), cx ** -0.5), ((f, cg), cg ** -0.5), ((f,), 0.3), ((f,), 1.0),
                                        ((1,), 1.0))]
        exact = _outputs_and_grads(reference.attention_gate, x, g, weights)
        for layout in (torch.contiguous_format, torch.channels_last):
            for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
                lo = (x.to(dtype).contiguous(memory_format=layout), g.to(dtype).contiguous(memory_format=layout),
                      [wt.to(dtype) for wt in weights])
                ref = _outputs_and_grads(reference.attention_gate, *lo)
                try:
                    fast = _outputs_and_grads(attention_gate_triton, *lo)
                except Exception as e:  # a kernel that does not compile is one failure, not the end of the call
                    checks += 1
                    failures.append(f"attention_gate {(n, cx, cg, f, h, w)} {dtype} {layout}: "
                                    f"{type(e).__name__}: {str(e)[:600]}")
                    continue
                for name, a, r, e in zip(NAMES, fast, ref, exact):
                    scale = e.abs().max().item() or 1.0
                    if dtype in (torch.float64, torch.float32):
                        # fp32: tl.dot may use TF32 the way cuDNN's 1x1 convolution does
                        bound = (1e-9 if dtype == torch.float64 else 5e-3) * scale
                        err = (a.double() - r.double()).abs().max().item()
                    else:  # ratio rule
                        bound = 2 * (r.double() - e).abs().max().item() + 1e-6 * scale
                        err = (a.double() - e).abs().max().item()
                    checks += 1
                    if not (err <= bound and a.dtype == r.dtype and torch.isfinite(a).all()):
                        failures.append(f"attention_gate {name} {(n, cx, cg, f, h, w)} {dtype} {layout}: "
                                        f"err {err:.3g} > {bound:.3g}")
    return checks, failures


def section_attention_gate(ctx) -> dict:
    """Checks, then eager / fast / torch.compile(reference) per decoder level, dtype and pass."""
    from benchmarks.gpu_report import Timing, _compile_or_reason, launches_per_call, peak_added_mb
    from r2unet_fast.ops import reference
    from r2unet_fast.ops.library.attention_gate import attention_gate_triton
    from r2unet_fast.ops.triton import attention_gate as kernels

    shapes = [(2, 5, 7, 3, 13, 9)] if ctx.smoke else [(2, 5, 7, 3, 13, 9), (3, 64, 64, 32, 37, 29),
                                                        (2, 512, 512, 256, 16, 16)]
    checks, failures = check(ctx, shapes)
    ctx.report_checks("attention_gate", checks, failures)
    ctx.start_timings()
    levels = [(2, 8, 16)] if ctx.smoke else GPU_LEVELS
    compiled, note = (None, "skipped in --cpu-smoke") if ctx.smoke else _compile_or_reason(reference.attention_gate)
    impls = {"eager": reference.attention_gate, "fast": attention_gate_triton, "compile": compiled}
    timings = []
    for n, c, size in levels:
        for dtype in (torch.float32, torch.bfloat16):
            x, g, weights = gate_inputs(n, c, size, ctx.device, dtype)
            act = x.numel() * x.element_size()
            psi_bytes = act // c
            fwd_bytes = 3 * act + psi_bytes  # read x, g; write out, psi
            for pass_ in PASSES:
                nbytes = fwd_bytes if pass_ == "fwd" else fwd_bytes + 5 * act  # bwd: read x, g, grad; write dx, dg
                row = Timing("attention_gate", pass_, str(dtype).replace("torch.", ""), [n, c, size, size], nbytes)
                for impl, fn in impls.items():
                    if fn is None:
                        row.ms[impl], row.notes[impl] = None, note
                        continue
                    step = gate_step(fn, x, g, weights, pass_)
                    try:
                        row.ms[impl] = ctx.bench_ms(step)
                        row.peak_mb[impl] = peak_added_mb(step, ctx.device)
                        row.launches[impl] = launches_per_call(step, ctx.device)
                        if pass_ == "fwd+bwd":
                            saved = saved_for_backward_bytes(lambda: gate_call(fn, x, g, weights), (x, g, *weights))
                            row.notes[impl] = f"saved beyond inputs {saved / 2**20:.1f} MiB"
                    except Exception as e:  # compile may fail; keep the others' numbers
                        row.ms[impl], row.notes[impl] = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                timings.append(row)
                ctx.emit(row)
    return {"name": "attention_gate", "checks_passed": not failures, "check_failures": failures, "timings": timings,
            "autotune_winners": kernels.tuned_configs() if hasattr(kernels, "tuned_configs") else {}}
