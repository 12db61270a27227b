"""What benchmarks/gpu_train.py runs, one piece at a time: the synthetic data set in the decode
cache, one ``python -m r2unet_fast.train`` subprocess with its logs and its log.csv summary, and
the one-process torchrun DDP check."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def folder_size_for(train: int) -> int:
    """The smallest folder whose seeded 70/10/20 split (r2unet_fast.data.splits) trains on ``train`` images."""
    from r2unet_fast.data.splits import SEEDED_FRACTIONS

    n = train
    while n - max(1, round(SEEDED_FRACTIONS[1] * n)) - max(1, round(SEEDED_FRACTIONS[2] * n)) != train:
        n += 1  # the train count grows by at most 1 per step, so this lands exactly
    return n


def _write_items(root: str, size: int, seed: int, start: int, stop: int) -> None:
    import numpy as np
    from PIL import Image

    from r2unet_fast.data.synthetic import SyntheticLesions, synthetic_id

    lesions = SyntheticLesions(stop, size, seed)
    for index in range(start, stop):
        image, mask = lesions.render(index)
        Image.fromarray(image).save(Path(root, "images", f"{synthetic_id(index)}.png"))
        Image.fromarray(mask * np.uint8(255)).save(Path(root, "masks", f"{synthetic_id(index)}.png"))


def build_data(cache: Path, sizes: Any, seed: int = 0) -> dict[str, Any]:
    """A folder of synthetic PNGs under ``cache``, decoded into the decode cache there; reused when present.
    ``sizes``: gpu_train.Sizes (image_size, steps, batch_size)."""
    from torch.utils.data import DataLoader

    from r2unet_fast.train import TrainConfig
    from r2unet_fast.train.loaders import build_splits

    started, n = time.perf_counter(), folder_size_for(sizes.steps * sizes.batch_size)
    root = cache / "gpu-train-data" / f"synthetic-{sizes.image_size}px-{n}-seed{seed}"
    marker, procs = root / "complete.json", min(8, os.cpu_count() or 1)
    if not marker.is_file():
        shutil.rmtree(root, ignore_errors=True)
        for sub in ("images", "masks"):
            (root / sub).mkdir(parents=True)
        chunks = [(i, min(n, i + -(-n // procs))) for i in range(0, n, -(-n // procs))]
        with ProcessPoolExecutor(procs) as pool:
            list(pool.map(_write_items, *zip(*[(str(root), sizes.image_size, seed, a, b) for a, b in chunks])))
        marker.write_text(json.dumps({"n": n, "size": sizes.image_size, "seed": seed}))
    config = TrainConfig(dataset="folder", data=str(root), image_size=sizes.image_size, cache_dir=str(cache))
    for dataset in build_splits(config, augment=False).values():  # decode every sample into the cache
        for _ in DataLoader(dataset, batch_size=16, num_workers=procs):
            pass
    return {"root": str(root), "images": n, "train_images": sizes.steps * sizes.batch_size,
            "seconds": round(time.perf_counter() - started, 1)}


def run_logged(command: list[str], timeout: float, log_stem: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``command`` in its own process group (killed whole at ``timeout``); stdout/stderr to files."""
    started = time.monotonic()
    with open(f"{log_stem}.out", "w") as out, open(f"{log_stem}.err", "w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=REPO, start_new_session=True)
        code: int | None = None
        try:
            code = process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            pass
        finally:  # on the timeout or Ctrl-C, take its DataLoader and compile workers down too; SIGTERM
            # first, which torchrun passes on to its workers (they run in a session of their own)
            for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, None)) if code is None else ():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=grace)
                    break
    errors = [line for line in Path(f"{log_stem}.err").read_text(errors="replace").splitlines() if line.strip()]
    return {"returncode": code, "wall_s": round(time.monotonic() - started, 1),
            "status": "ok" if code == 0 else ("timeout" if code is None else "failed"),
            "command": shlex.join(command), "last_stderr": None if code == 0 or not errors else errors[-1][-300:]}


def epoch_summary(log_csv: Path, warmup: int = 1) -> dict[str, Any]:
    """Per-epoch numbers from a run's log.csv, and their steady-state summary (epochs after ``warmup``)."""
    with open(log_csv) as file:
        rows = list(csv.DictReader(file))

    def column(name: str) -> list[float | None]:
        return [float(r[name]) if r.get(name) not in (None, "") else None for r in rows]

    def steady(values: list[float | None], pick: Any = statistics.median) -> float | None:
        kept = [v for v in (values[warmup:] if len(values) > warmup else values) if v is not None]
        return pick(kept) if kept else None

    rate, wait, peak = column("images_per_s"), column("data_wait_share"), column("peak_memory_mb")
    return {"images_per_s": steady(rate), "images_per_s_epochs": rate, "peak_memory_mb": steady(peak, max),
            "peak_memory_mb_epochs": peak, "data_wait_share": steady(wait), "data_wait_share_epochs": wait,
            "train_loss_epochs": column("train_loss"), "epoch_seconds": column("seconds")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_check(device: str, work: Path, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """One process through torchrun: the trainer joins a process group (nccl/gloo) and trains under DDP."""
    out = work / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "r2unet_fast.train", "--synthetic-sizes", "16", "8", "8",
               "--image-size", "64", "--base-channels", "8", "--depth", "3", "--batch-size", "4", "--epochs", "1",
               "--workers", "2", "--preview", "0", "--device", device, "--out", str(out)]
    result = run_logged(command, timeout, work / "logs" / "ddp", env)
    stdout = Path(work / "logs" / "ddp.out").read_text(errors="replace").splitlines()
    line = next((x for x in stdout if x.startswith("run folder")), None)
    expected = "(DDP, nccl)" if device.startswith("cuda") else "(DDP, gloo)"
    passed = result["status"] == "ok" and line is not None and expected in line
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {**result, "passed": passed, "backend_line": line, "expected": expected}


def ensure_albumentations(env: dict[str, str]) -> None:
    """Install the wheels carried in .whl/ (bash benchmarks/gpu_check.sh --fetch-wheels) when the image lacks
    albumentations, for this process and its children."""
    for variables in (os.environ, env):  # else albumentations asks PyPI for a newer version on import
        variables.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        import albumentations  # noqa: F401
        return
    except ImportError:
        wheels = sorted(str(p) for p in (REPO / ".whl").glob("*.whl"))
        if not wheels:
            raise SystemExit("albumentations is missing and .whl/ is empty: run `bash benchmarks/gpu_check.sh "
                             "--fetch-wheels` where pip works and carry .whl/") from None
    site = tempfile.mkdtemp(prefix="gpu-train-site-")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", site, *wheels], check=True)
    sys.path.insert(0, site)
    env["PYTHONPATH"] = os.pathsep.join([site, env["PYTHONPATH"]])
