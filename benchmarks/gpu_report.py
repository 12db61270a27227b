"""The one command to run on a GPU (docs/design.md section 4).

    PYTHONPATH=. python benchmarks/gpu_report.py --out benchmarks/results/<gpu>-<date>.json

For every section (one per fused op; add yours to SECTIONS; ``--sections``
picks and orders them): check the compiled Triton kernels against the
reference on CUDA (several shapes and dtypes; every mismatch is printed and
makes the exit status 1), then time eager reference, fast and
``torch.compile(reference)`` with ``triton.testing.do_bench`` medians, report
achieved GB/s as a share of the measured device-to-device copy bandwidth,
speedups and launches. ``--autotune`` times autotuned tiles instead of the
default ones and prints the winners to commit. Each row is printed as it is
measured and the JSON is rewritten after every section (and on SIGTERM), so a
call killed at its time cap keeps what it measured. Needs no network and no
pytest. ``--cpu-smoke`` runs the same logic on CPU through the Triton
interpreter at toy sizes, to test the script itself.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from benchmarks.steps import loss_step


@dataclass
class Context:
    device: torch.device
    smoke: bool
    copy_gbps: float = 0.0
    started: float = field(default_factory=time.time)
    pending: list["Timing"] = field(default_factory=list)  # rows of the section in progress
    autotune: bool = False  # --autotune: time autotuned tiles (checks always run the default tiles)

    def start_timings(self) -> None:
        """Called by each section between its checks and its timings."""
        from r2unet_fast.ops.triton import tuning

        tuning.AUTOTUNE = self.autotune

    def bench_ms(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of ``fn``."""
        if self.smoke:
            fn()
            times = []
            for _ in range(3):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return sorted(times)[1]
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def report_checks(self, op: str, checks: int, failures: list[str]) -> None:
        """Print the outcome of ``op``'s checks; the section goes on to its timings either way."""
        print(f"  [{time.time() - self.started:.0f} s] {op}: {checks - len(failures)} of {checks} checks passed",
              flush=True)
        if failures:
            print(f"FAILED: Triton {op} disagrees with the reference:\n  " + "\n  ".join(failures), flush=True)

    def emit(self, row: "Timing") -> None:
        """Print one measured row at once: a call killed at its cap still shows what it measured."""
        self.pending.append(row)
        ms = ", ".join(f"{k} {_fmt(v, '.4f')}" for k, v in row.ms.items())
        print(f"  [{time.time() - self.started:.0f} s] {row.op} {row.pass_} {row.dtype} {row.shape}: {ms}", flush=True)


@dataclass
class Timing:
    op: str
    pass_: str
    dtype: str
    shape: list[int]
    bytes_moved: int
    ms: dict[str, float | None] = field(default_factory=dict)  # impl -> median ms (None: unavailable)
    notes: dict[str, str] = field(default_factory=dict)
    peak_mb: dict[str, float | None] = field(default_factory=dict)  # impl -> memory one call adds at its peak
    launches: dict[str, int | None] = field(default_factory=dict)  # impl -> device kernels (CPU: ATen ops) per call

    def gbps(self, impl: str) -> float | None:
        ms = self.ms.get(impl)
        return None if ms is None else self.bytes_moved / (ms * 1e-3) / 1e9


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _loss_and_grads(fn: Callable, logits: torch.Tensor, target: torch.Tensor, **kw) -> list[torch.Tensor]:
    x = logits.detach().clone().requires_grad_()
    t = target.detach().clone().requires_grad_()
    loss = fn(x, t, **kw)
    (loss * 1.7).backward()
    return [loss.detach(), x.grad, t.grad]


def _compile_or_reason(fn: Callable) -> tuple[Callable | None, str]:
    try:
        return torch.compile(fn), ""
    except Exception as e:  # report and carry on with eager and fast
        return None, f"torch.compile failed: {type(e).__name__}: {e}"


def peak_added_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """MiB one call of ``fn`` adds at its peak on top of what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def launches_per_call(fn: Callable[[], object], device: torch.device) -> int:
    """Device kernels (memcpy/memset included) one call of ``fn`` launches; on CPU, the ATen ops it runs."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if device.type == "cuda":
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)


def copy_bandwidth_gbps(ctx: Context) -> float:
    """Achieved GB/s of a large device-to-device copy (read + write bytes)."""
    numel = (1 << 16) if ctx.smoke else (1 << 28)  # 1 GiB of float32 per buffer on the GPU
    src = torch.randn(numel, device=ctx.device)
    dst = torch.empty_like(src)
    ms = ctx.bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def section_hybrid_loss(ctx: Context) -> dict:
    from r2unet_fast.ops import reference
    from r2unet_fast.ops.library import hybrid_loss as lib
    from r2unet_fast.ops.triton import hybrid_loss as kernels

    dev = ctx.device
    failures: list[str] = []
    shapes = [(2, 1, 13, 11), (1, 1, 37, 29)] if ctx.smoke else \
        [(16, 1, 256, 256), (3, 1, 37, 29), (1, 1, 513, 1023), (4, 3, 64, 65)]
    options = [{}, {"pos_weight": 2.0, "per_image": False, "smooth": 0.5},
               {"dice_weight": 0.0, "bce_weight": 1.0, "pos_weight": 3.0}, {"dice_weight": 1.0, "bce_weight": 0.0}]
    for shape in shapes:
        for opt in options:
            logits = torch.randn(shape, device=dev, dtype=torch.float64) * 3
            target = (torch.rand(shape, device=dev, dtype=torch.float64) > 0.6).double()
            if shape[1] > 1:
                logits = logits.to(memory_format=torch.channels_last)
            exact = _loss_and_grads(reference.hybrid_loss, logits, target, **opt)
            for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
                lo = (logits.to(dtype), target.to(dtype))
                fast = _loss_and_grads(lib.hybrid_loss_triton, *lo, **opt)
                ref = _loss_and_grads(reference.hybrid_loss, *lo, **opt)
                for name, f, r, e in zip(("loss", "grad_logits", "grad_target"), fast, ref, exact):
                    scale = e.abs().max().item() or 1.0
                    if dtype in (torch.float64, torch.float32):
                        bound = (1e-9 if dtype == torch.float64 else 2e-5) * scale
                        ok, err = _max_err(f, r) <= bound, _max_err(f, r)
                    else:  # the ratio rule, docs/design.md section 3
                        bound = 2 * _max_err(r, e) + 1e-6 * scale
                        ok, err = _max_err(f, e) <= bound, _max_err(f, e)
                    if not (ok and torch.isfinite(f).all() and f.dtype == r.dtype):
                        failures.append(f"hybrid_loss {name} {tuple(shape)} {dtype} {opt}: err {err:.3g} > {bound:.3g}")
    checks = len(shapes) * len(options) * 4 * 3
    ctx.report_checks("hybrid_loss", checks, failures)

    ctx.start_timings()
    shape = (2, 1, 64, 64) if ctx.smoke else (16, 1, 256, 256)
    compiled, compile_note = (None, "skipped in --cpu-smoke") if ctx.smoke else _compile_or_reason(
        reference.hybrid_loss)
    impls = {"eager": reference.hybrid_loss, "fast": lib.hybrid_loss_triton, "compile": compiled}
    timings = []
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(shape, device=dev) * 3).to(dtype).requires_grad_()
        target = (torch.rand(shape, device=dev) > 0.7).to(dtype)
        io_bytes = logits.numel() * logits.element_size() + target.numel() * target.element_size()
        grad_bytes = logits.numel() * logits.element_size()
        for pass_, nbytes in (("fwd", io_bytes), ("fwd+bwd", 2 * io_bytes + grad_bytes)):
            row = Timing("hybrid_loss", pass_, str(dtype).replace("torch.", ""), list(shape), nbytes)
            for impl, fn in impls.items():
                if fn is None:
                    row.ms[impl], row.notes[impl] = None, compile_note
                    continue
                step = loss_step(fn, logits, target, pass_)
                try:
                    row.ms[impl] = ctx.bench_ms(step)
                    row.peak_mb[impl] = peak_added_mb(step, dev)
                    row.launches[impl] = launches_per_call(step, dev)
                except Exception as e:  # only compile is expected to fail; keep the others' numbers
                    row.ms[impl], row.notes[impl] = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            timings.append(row)
            ctx.emit(row)
    return {"name": "hybrid_loss", "checks_passed": not failures, "check_failures": failures, "timings": timings,
            "autotune_winners": kernels.tuned_configs()}


def section_attention_gate(ctx: Context) -> dict:
    from benchmarks.gpu_report_attention_gate import section_attention_gate as section

    return section(ctx)


def section_recurrent_conv(ctx: Context) -> dict:
    from benchmarks.gpu_report_recurrent_conv import section_recurrent_conv as section

    return section(ctx)


def section_train_step(ctx: Context) -> dict:
    from benchmarks.gpu_report_train_step import section_train_step as section

    return section(ctx)


# Each op's section returns {"name", "timings", ...}; later ops add theirs.
SECTIONS: dict[str, Callable[[Context], dict]] = {"hybrid_loss": section_hybrid_loss,
                                                  "attention_gate": section_attention_gate,
                                                  "recurrent_conv": section_recurrent_conv,
                                                  "train_step": section_train_step}


def _write_json(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def _git_commit() -> str:
    """HEAD (``-dirty`` with local changes), or $R2UNET_FAST_COMMIT when set: a copied working tree
    may carry a stale .git (seen on the GPU machine), so gpu_check.sh's caller can name the commit."""
    if os.environ.get("R2UNET_FAST_COMMIT"):
        return os.environ["R2UNET_FAST_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(timings: list[Timing], copy_gbps: float) -> str:
    """Plain-text table: one row per op/pass/dtype."""
    head = (f"{'op':<16}{'pass':<9}{'dtype':<10}{'eager ms':>10}{'compile ms':>12}{'fast ms':>10}"
            f"{'x eager':>9}{'x compile':>11}{'fast GB/s':>11}{'% copy BW':>11}{'launches e/c/f':>16}")
    lines = [head, "-" * len(head)]
    for t in timings:
        eager, comp, fast = (t.ms.get(k) for k in ("eager", "compile", "fast"))
        gbps = t.gbps("fast")
        lines.append(
            f"{t.op:<16}{t.pass_:<9}{t.dtype:<10}{_fmt(eager, '.4f'):>10}{_fmt(comp, '.4f'):>12}{_fmt(fast, '.4f'):>10}"
            f"{_fmt(eager / fast if eager and fast else None, '.2f'):>9}"
            f"{_fmt(comp / fast if comp and fast else None, '.2f'):>11}{_fmt(gbps, '.0f'):>11}"
            f"{_fmt(100 * gbps / copy_gbps if gbps else None, '.1f'):>11}"
            f"{'/'.join(_fmt(t.launches.get(k), 'd') for k in ('eager', 'compile', 'fast')):>16}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON path, e.g. benchmarks/results/h100-2025-01-31.json")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run on CPU through the Triton interpreter at toy sizes (tests the script, not speed)")
    parser.add_argument("--autotune", action="store_true",
                        help="time autotuned tiles and print the winners to commit (compiles every config: minutes)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, in this order (default: all, {','.join(SECTIONS)})")
    args = parser.parse_args(argv)
    unknown = [name for name in args.sections.split(",") if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("gpu_report.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "use `pytest benchmarks/ --benchmark-only` on CPU, or --cpu-smoke to test this script.",
              file=sys.stderr)
        return 2
    import triton

    ctx = Context(torch.device("cpu" if args.cpu_smoke else "cuda"), smoke=args.cpu_smoke, autotune=args.autotune)
    started = time.time()
    ctx.copy_gbps = copy_bandwidth_gbps(ctx)
    print(f"device-to-device copy: {ctx.copy_gbps:.0f} GB/s", flush=True)
    report = {
        "kind": "gpu_report",
        "gpu": "cpu-smoke" if args.cpu_smoke else torch.cuda.get_device_name(ctx.device),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "git_commit": _git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_gbps": ctx.copy_gbps, "seconds": 0.0, "sections": [],
    }
    sections: list[dict] = []

    def save(partial: str | None = None) -> None:
        report["seconds"] = round(time.time() - started, 1)
        report["sections"] = [{**s, "timings": [asdict(t) for t in s["timings"]]} for s in sections]
        if partial and ctx.pending:  # killed mid-section: keep its measured rows, marked as such
            report["sections"].append({"name": partial, "partial": True, "checks_passed": None,
                                       "timings": [asdict(t) for t in ctx.pending]})
        _write_json(args.out, report)

    # gpu_check.sh's stage cap sends SIGTERM: leave through `finally`, which saves what was measured
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    name = None
    try:
        for name in args.sections.split(","):
            ctx.pending = []
            sections.append(SECTIONS[name](ctx))
            save()
        name = None
    finally:
        if name is not None:
            save(partial=name)
    timings = [t for s in sections for t in s["timings"]]
    for s in sections:
        for kernel, winners in s.get("autotune_winners", {}).items():
            for w in winners:
                print(f"autotune winner {s['name']}: TUNED_TILES[{w['key']!r}] = {w['tile']}")
    print(f"wrote {args.out} ({report['seconds']} s)\n")
    print(table(timings, ctx.copy_gbps))
    failed = [s["name"] for s in sections if not s["checks_passed"]]
    if failed:
        print(f"FAILED checks: {', '.join(failed)} (above); the timings of a failed op are not results", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
