"""The training step of the reference and the fast model, timed in interleaved rounds.

pytest-benchmark times one case after another, so on a machine whose speed drifts over minutes (a
shared VM) a slow spell lands on whichever side runs then. Here every round times each side once,
in the same process, on the same weights and batch (``benchmarks/test_train_step.py``'s model,
batch and :class:`benchmarks.steps.TrainStep`), so drift reaches both sides alike; the ratio of the
medians (and of the minimums) is the number to trust. Usage::

    python benchmarks/train_step_interleaved.py --rounds 15 \\
        --out benchmarks/results/cpu-2core-step-interleaved-<date>.json
    python benchmarks/train_step_interleaved.py --processes --rounds 25 \\
        --out benchmarks/results/cpu-2core-step-processes-<date>.json

With ``--processes``, each side runs in its own Python process (one model per process, as the
trainer runs it), and the rounds still alternate between the two: each process waits while the
other times its step. In one process the two sides share glibc's heap, and which of them re-faults
the memory the heap gives back to the OS between steps depends on the other; in their own
processes each side pays its own. The report then also gives each side's minor page faults per
step (the median over rounds).

Writes JSON (``"kind": "interleaved_step"``, ``"mode"``: ``"one_process"`` or ``"processes"``):
machine, torch threads, git commit, UTC date, the shape, and per side the times of every timed step
in ms with min, median and interquartile range, plus the reference-over-fast ratios.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.test_train_step import CPU_SHAPES, GPU_SHAPES, StepShape, train_step  # noqa: E402

SIDES = ("reference", "fast")


def summary(times_ms: list[float]) -> dict[str, float]:
    """min, median and interquartile range of one side's round times."""
    q1, _, q3 = statistics.quantiles(times_ms, n=4) if len(times_ms) > 1 else (times_ms[0],) * 3
    return {"min_ms": min(times_ms), "median_ms": statistics.median(times_ms), "iqr_ms": q3 - q1}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=REPO, capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _side_step(shape: StepShape, side: str, device: torch.device):
    return train_step(shape, side, torch.float32, device, "auto" if side == "fast" else "reference")


def _timed_ms(step, device: torch.device) -> float:
    """One step's wall time in ms (the GPU's work included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def measure(shape: StepShape, rounds: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Round times in ms per side in :data:`SIDES`, each round timing every side once."""
    steps = {side: _side_step(shape, side, device) for side in SIDES}
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    for _ in range(rounds):
        for side, step in steps.items():
            times[side].append(_timed_ms(step, device))
    return times


def serve(shape: StepShape, side: str, warmup: int, device: torch.device) -> None:
    """Worker of :func:`measure_in_processes`: build ``side``'s step, run ``warmup`` steps, print
    ``ready``, then for each ``step`` line on stdin time one step and print its ms and the minor
    page faults it took, as JSON; stop at end of input."""
    step = _side_step(shape, side, device)
    for _ in range(warmup):
        step()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ms = _timed_ms(step, device)
        print(json.dumps({"ms": ms, "minflt": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}),
              flush=True)


def _reply(worker: subprocess.Popen, side: str) -> str:
    line = worker.stdout.readline()
    if not line:
        raise RuntimeError(f"the {side} process stopped (exit {worker.wait()}; its error is above)")
    return line.strip()


def measure_in_processes(shape: StepShape, rounds: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Per side, ``times_ms`` and ``minflt`` of every round: each side in its own process of this
    script (:func:`serve`), the rounds alternating between them as in :func:`measure`, so both
    see the same spells of the machine but not each other's heap."""
    spec = f"{shape.base},{shape.depth},{shape.batch},{shape.size}"
    workers = {side: subprocess.Popen([sys.executable, __file__, "--serve", side, "--warmup", str(warmup),
                                       "--shape", spec], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, bufsize=1)
               for side in SIDES}
    runs: dict[str, dict[str, list[float]]] = {side: {"times_ms": [], "minflt": []} for side in SIDES}
    try:
        for side, worker in workers.items():
            if _reply(worker, side) != "ready":
                raise RuntimeError(f"the {side} process did not start its steps")
        for _ in range(rounds):
            for side, worker in workers.items():
                worker.stdin.write("step\n")
                timed = json.loads(_reply(worker, side))
                runs[side]["times_ms"].append(timed["ms"])
                runs[side]["minflt"].append(timed["minflt"])
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait(timeout=60)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (default 2)")
    parser.add_argument("--processes", action="store_true",
                        help="each side in its own process (one model per process), rounds still alternating")
    parser.add_argument("--serve", choices=SIDES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default=None, help="base,depth,batch,size (default: the benchmark suite's)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be at least 1 and --warmup at least 0")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)[0]
    if args.shape is not None:
        try:
            base, depth, batch, size = (int(v) for v in args.shape.split(","))
        except ValueError:
            parser.error(f"--shape takes four integers base,depth,batch,size, got {args.shape!r}")
        shape = StepShape("custom", base, depth, batch, size, shape.tied)
    if args.serve is not None:
        serve(shape, args.serve, args.warmup, device)
        return 0
    if args.processes:
        runs = measure_in_processes(shape, args.rounds, args.warmup)
        sides = {side: {**summary(run["times_ms"]), "times_ms": run["times_ms"],
                        "minflt_per_step": statistics.median(run["minflt"])} for side, run in runs.items()}
    else:
        times = measure(shape, args.rounds, args.warmup, device)
        sides = {side: {**summary(t), "times_ms": t} for side, t in times.items()}
    result = {
        "kind": "interleaved_step", "mode": "processes" if args.processes else "one_process",
        "machine": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shape": shape._asdict(), "rounds": args.rounds, "sides": sides,
        "speedup_median": sides["reference"]["median_ms"] / sides["fast"]["median_ms"],
        "speedup_min": sides["reference"]["min_ms"] / sides["fast"]["min_ms"],
    }
    for side, s in sides.items():
        faults = f"  {s['minflt_per_step']:8.0f} minor faults/step" if "minflt_per_step" in s else ""
        print(f"{side:10s} min {s['min_ms']:8.1f}  median {s['median_ms']:8.1f}  IQR {s['iqr_ms']:6.1f} ms{faults}")
    print(f"fast vs reference: {result['speedup_median']:.2f}x by median, {result['speedup_min']:.2f}x by min")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
