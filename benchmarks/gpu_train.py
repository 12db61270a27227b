"""Training throughput on a GPU, end to end through the real trainer (issue #15).

    PYTHONPATH=. python benchmarks/gpu_train.py [--budget-s 330] [--out FILE.json]
    PYTHONPATH=. python benchmarks/gpu_train.py --cpu-smoke      # the same logic on CPU at toy sizes

1. Writes a synthetic lesion set (PNG) once and decodes it into the decode cache, so every run reads
   cached samples as from a real dataset and no generation cost lands in a timed epoch.
2. Runs ``python -m r2unet_fast.train`` for each variant in VARIANTS order (R2AttU-Net base 64, depth 5,
   t=2, batch 16, 256 px, E epochs of S steps; epoch 1 is warm-up, images/s is the median of the
   others). A variant that the time left cannot hold is skipped with the reason; a failure never
   stops the others.
3. Proves the DDP path: ``torch.distributed.run --nproc_per_node 1`` (nccl on CUDA, gloo on CPU).
4. Profiles steps of the fast model at bf16 in this process (benchmarks/train_profile.py).
The pieces (data, one trainer run, the DDP check) are in benchmarks/train_runs.py.
--budget-s bounds all of it: time for 3 and 4 is set aside before the variants start. The JSON is
rewritten after every stage (a killed call keeps what finished) to
benchmarks/results/<gpu>-train-<UTC date>.json; with $OUT set, it, the profile and the run logs are
copied there. A table is printed last. Exit 0 when every run that started succeeded.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/gpu_train.py` puts benchmarks/, not the repo, on the path
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_report import _git_commit  # noqa: E402
from benchmarks.train_runs import build_data, ddp_check, ensure_albumentations, epoch_summary, run_logged  # noqa: E402


@dataclass(frozen=True)
class Variant:
    backend: str  # "reference" or "auto" (= the fast kernels)
    compile: bool
    amp: str  # "bf16" or "off" (fp32)
    tied: bool = False  # the popular PyTorch layout: --tied --shared-norm --attention-norm

    @property
    def precision(self) -> str:
        return "fp32" if self.amp == "off" else self.amp

    @property
    def name(self) -> str:
        parts = ["fast" if self.backend == "auto" else self.backend, "compile" if self.compile else "eager",
                 self.precision]
        return "-".join(parts + (["tied"] if self.tied else []))

    def flags(self) -> list[str]:
        return (["--backend", self.backend, "--amp", self.amp] + (["--compile"] if self.compile else [])
                + (["--tied", "--shared-norm", "--attention-norm"] if self.tied else []))


# Priority order: what is measured first when the budget runs short.
VARIANTS: tuple[Variant, ...] = tuple(Variant(b, c, a) for c in (False, True) for a in ("bf16", "off")
                                      for b in ("reference", "auto")) + \
    (Variant("reference", False, "bf16", True), Variant("auto", False, "bf16", True))
SMOKE_VARIANTS: tuple[str, ...] = ("reference-eager-fp32", "fast-eager-fp32")


@dataclass(frozen=True)
class Sizes:
    image_size: int
    base_channels: int
    depth: int
    t: int
    batch_size: int
    epochs: int
    steps: int  # per epoch: the training set holds exactly steps * batch_size images

    def flags(self) -> list[str]:
        return ["--image-size", str(self.image_size), "--base-channels", str(self.base_channels), "--depth",
                str(self.depth), "--t", str(self.t), "--batch-size", str(self.batch_size), "--epochs", str(self.epochs)]


GPU_SIZES = Sizes(image_size=256, base_channels=64, depth=5, t=2, batch_size=16, epochs=3, steps=16)
SMOKE_SIZES = Sizes(image_size=32, base_channels=4, depth=2, t=2, batch_size=2, epochs=2, steps=2)
# First guesses of each stage's seconds, replaced by measured ones as runs finish (GPU, then CPU smoke).
PRIOR_S = {"eager": 30.0, "compile": 150.0, "ddp": 20.0, "profile": 30.0}
SMOKE_PRIOR_S = {"eager": 20.0, "compile": 150.0, "ddp": 30.0, "profile": 15.0}


def gpu_short_name(name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100" (the same rule as benchmarks/gpu_check.sh)."""
    match = re.search(r"\b([A-Z]+\d{2,4}[A-Z]*)\b", name)
    return (match.group(1) if match else re.sub(r"\W+", "-", name)).lower()


def estimate_s(variant: Variant, rows: list[dict[str, Any]], prior: dict[str, float]) -> float:
    """Expected seconds of ``variant``: the slowest finished run with the same compile/amp/tied (a repeat
    reuses compile caches, so it is no slower), else the slowest with the same compile flag, else the prior."""
    walls = [r for r in rows if r.get("wall_s") is not None and r["compile"] == variant.compile]
    same = [r["wall_s"] for r in walls if (r["amp"], r["tied"]) == (variant.precision, variant.tied)]
    pool = same or [r["wall_s"] for r in walls]
    return max(pool) if pool else prior["compile" if variant.compile else "eager"]


def _scratch() -> Path:
    """Run folders on /dev/shm when it has room: each run writes GB-sized checkpoints every epoch."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and shutil.disk_usage(shm).free > 16 * 2**30 else None
    return Path(tempfile.mkdtemp(prefix="gpu-train-", dir=base))


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(report: dict[str, Any]) -> str:
    """Plain-text summary: one line per variant, then DDP and the profile's phases."""
    ok = {r["variant"]: r for r in report["rows"] if r["status"] == "ok"}
    head = (f"{'variant':<26}{'status':<9}{'img/s':>8}{'x ref':>7}{'peak MiB':>10}{'data wait':>11}{'wall s':>8}"
            "  train loss per epoch")
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        base = ok.get(r["variant"].replace("fast-", "reference-").replace("-compile-", "-eager-"))
        rate = r.get("images_per_s")
        ratio = rate / base["images_per_s"] if rate and base else None
        losses = " ".join(f"{v:.4f}" for v in r.get("train_loss_epochs") or [] if v is not None)
        lines.append(f"{r['variant']:<26}{r['status']:<9}{_num(rate, '.1f'):>8}{_num(ratio, '.2f'):>7}"
                     f"{_num(r.get('peak_memory_mb'), '.0f'):>10}{_num(r.get('data_wait_share'), '.1%'):>11}"
                     f"{_num(r.get('wall_s'), '.1f'):>8}  " + (losses or r.get("reason") or r.get("last_stderr") or ""))
    ddp = report.get("ddp") or {}
    lines.append(f"DDP: {'passed' if ddp.get('passed') else ddp.get('status', 'not run')} "
                 f"{ddp.get('backend_line') or ddp.get('reason') or ddp.get('last_stderr') or ''}")
    profile = report.get("profile") or {}
    if "phases" in profile:
        from benchmarks.train_profile import phase_text

        lines.append(phase_text(profile, top=8))
    else:
        lines.append(f"profile: {profile.get('status', 'not run')} {profile.get('reason', '')}")
    return "\n".join(lines)


def environment(smoke: bool) -> dict[str, Any]:
    """What ran it: GPU name and short name, library versions, git commit, UTC date."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = "cpu-smoke" if smoke else torch.cuda.get_device_name(0)
    return {"kind": "gpu_train", "gpu": gpu, "gpu_short": "cpu-smoke" if smoke else gpu_short_name(gpu),
            "device": "cpu" if smoke else "cuda", "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
            "git_commit": _git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat("T", "seconds")}


def run_variant(variant: Variant, common: list[str], work: Path, timeout: float, env: dict[str, str]) -> dict:
    """One ``python -m r2unet_fast.train`` run and its log.csv summary; its checkpoints are deleted."""
    out = work / variant.name
    command = [sys.executable, "-m", "r2unet_fast.train", *common, *variant.flags(), "--out", str(out)]
    row = run_logged(command, timeout, work / "logs" / variant.name, env)
    if (out / "log.csv").is_file():
        row.update(epoch_summary(out / "log.csv"))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return row


def run_profile(report: dict[str, Any], sizes: Sizes, cache: Path, seconds: float, text_path: Path) -> dict:
    """benchmarks/train_profile.py on the fast model at bf16, stopped after ``seconds``."""
    from benchmarks.train_profile import profile_training_steps, time_limit
    from r2unet_fast.train import TrainConfig

    config = TrainConfig(dataset="folder", data=report["data"]["root"], cache_dir=str(cache), split="seeded",
                         image_size=sizes.image_size, base_channels=sizes.base_channels, depth=sizes.depth, t=sizes.t,
                         batch_size=sizes.batch_size, amp="bf16", backend="auto", device=report["device"], workers=0,
                         preview=0)
    counts = dict(warmup=1, timed=2, profiled=2) if report["device"] == "cpu" else {}
    try:
        with time_limit(seconds):
            return {"status": "ok", **profile_training_steps(config, text_path=text_path, **counts)}
    except Exception as error:  # recorded, like a failed variant
        return {"status": "failed", "reason": f"{type(error).__name__}: {error}"[:300]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON path (default benchmarks/results/<gpu>-train-<date>.json)")
    parser.add_argument("--budget-s", type=float, default=330.0, help="seconds for everything (default 330)")
    parser.add_argument("--run-timeout-s", type=float, default=240.0, help="cap on one training run")
    parser.add_argument("--variants", help="comma-separated names to run in this order, or none (default: all)")
    parser.add_argument("--epochs", type=int, help="epochs per run (epoch 1 is warm-up)")
    parser.add_argument("--steps", type=int, help="training steps per epoch")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: the trainer's)")
    parser.add_argument("--cache-dir", help="decode cache and data (default $R2UNET_FAST_CACHE or a temp folder)")
    parser.add_argument("--cpu-smoke", action="store_true", help="on CPU at toy sizes (tests the script)")
    args = parser.parse_args(argv)
    # `timeout` (gpu_check.sh's stage cap) sends SIGTERM: exit through the finally blocks that stop the run
    # in flight, whose process group is not ours.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started, smoke = time.monotonic(), args.cpu_smoke
    deadline, prior = started + args.budget_s, SMOKE_PRIOR_S if smoke else PRIOR_S
    if not smoke and not torch.cuda.is_available():
        print("gpu_train.py needs a CUDA GPU; use --cpu-smoke to test the script on CPU", file=sys.stderr)
        return 2
    sizes = SMOKE_SIZES if smoke else GPU_SIZES
    sizes = Sizes(**{**asdict(sizes), **{k: getattr(args, k) for k in ("epochs", "steps") if getattr(args, k)}})
    by_name = {v.name: v for v in VARIANTS}
    names = [n for n in args.variants.split(",") if n != "none"] if args.variants else \
        list(SMOKE_VARIANTS if smoke else by_name)
    if unknown := [n for n in names if n not in by_name]:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(by_name)} or none")
    work = _scratch()
    (work / "logs").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    ensure_albumentations(env)
    cache = Path(args.cache_dir or os.environ.get("R2UNET_FAST_CACHE") or work / "cache").expanduser()
    env["R2UNET_FAST_CACHE"] = str(cache)
    report: dict[str, Any] = {**environment(smoke), "budget_s": args.budget_s, "sizes": asdict(sizes),
                              "workers": args.workers, "warmup_epochs": 1, "rows": [], "ddp": None, "profile": None}
    out_path = Path(args.out or (work if smoke else REPO / "benchmarks" / "results") /
                    f"{report['gpu_short']}-train-{report['date'][:10]}.json")
    profile_path = out_path.with_suffix(".profile.txt")

    def save() -> None:
        report["seconds"] = round(time.monotonic() - started, 1)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=1) + "\n")
        if os.environ.get("OUT"):
            for path in (out_path, profile_path):
                if path.is_file():
                    shutil.copy(path, Path(os.environ["OUT"], path.name))
            # one archive: the device returns at most 8 files from $OUT
            shutil.make_archive(str(Path(os.environ["OUT"], "gpu-train-logs")), "gztar", work / "logs")

    print(f"{report['gpu']}: torch {report['torch']}, triton {report['triton']}; work in {work}; "
          f"budget {args.budget_s:.0f} s", flush=True)
    report["data"] = build_data(cache, sizes)
    print(f"data: {report['data']}", flush=True)
    save()
    common = ["--dataset", "folder", "--data", report["data"]["root"], "--cache-dir", str(cache), "--split", "seeded",
              *sizes.flags(), "--lr", "1e-3", "--seed", "0", "--preview", "0", "--device", report["device"]] + \
        (["--workers", str(args.workers)] if args.workers is not None else [])
    for name in names:  # in priority order; DDP and the profile keep their share of the budget
        variant = by_name[name]
        row: dict[str, Any] = {"variant": name, **asdict(variant), "amp": variant.precision}
        need = estimate_s(variant, report["rows"], prior)
        left = deadline - prior["ddp"] - prior["profile"] - time.monotonic()
        report["rows"].append(row)
        if need > left:
            row.update(status="skipped", reason=f"budget: needs ~{need:.0f} s, {max(0.0, left):.0f} s left")
        else:  # saved as "running" first: a call killed now still shows which run it stopped
            row.update(status="running", started_s=round(time.monotonic() - started, 1))
            save()
            row.update(run_variant(variant, common, work, min(left, args.run_timeout_s), env))
        print(f"{name}: {row['status']} {_num(row.get('images_per_s'), '.1f')} img/s "
              f"{row.get('reason') or row.get('last_stderr') or ''}", flush=True)
        save()
    left = deadline - time.monotonic()
    report["ddp"] = ddp_check(report["device"], work, min(left, max(prior["ddp"], left - prior["profile"])), env) \
        if left >= prior["ddp"] else {"status": "skipped", "passed": False, "reason": f"budget: {left:.0f} s left"}
    print(f"ddp: {report['ddp']['status']} {report['ddp'].get('backend_line') or ''}", flush=True)
    save()
    left = deadline - time.monotonic()
    # The prior is generous: half of it still profiles a few steps.
    report["profile"] = run_profile(report, sizes, cache, left, profile_path) if left >= prior["profile"] / 2 \
        else {"status": "skipped", "reason": f"budget: {left:.0f} s left"}
    save()
    print(f"\nwrote {out_path} ({report['seconds']} s)\n\n{table(report)}", flush=True)
    stages = [r for r in report["rows"] if r["status"] != "skipped"] + \
        [s for s in (report["ddp"], report["profile"]) if s["status"] != "skipped"]
    failed = [s for s in stages if s["status"] != "ok" or s is report["ddp"] and not s["passed"]]
    return 0 if stages and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
