"""Helpers shared by the trainer / evaluate / predict tests (no tests here; imported by them)."""
from __future__ import annotations

import csv
import json
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest
from PIL import Image

from r2unet_fast.data import write_synthetic_folder

REPO = Path(__file__).resolve().parents[1]

# A model and data small enough for an epoch in well under a second on one core.
TINY: list[str] = ["--synthetic-sizes", "12", "6", "6", "--image-size", "32", "--base-channels", "4", "--depth", "3",
                   "--batch-size", "4", "--epochs", "1", "--workers", "0", "--preview", "2"]


def run(main: Callable[[Sequence[str]], int], argv: Sequence[str],
        capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main(argv)`` in-process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse's own exits (e.g. --help)
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code: int, err: str, *needles: str) -> None:
    """Exit 2 with exactly one stderr line ``error: ...`` that contains every needle."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def subprocess_env() -> dict[str, str]:
    """Environment for ``python -m`` children: the repo importable, one thread each, no home cache."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return env


def python() -> str:
    return sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_folder(root: Path, n: int = 10, size: tuple[int, int] = (48, 36), seed: int = 0) -> Path:
    """images/ + masks/ of ``n`` synthetic lesions at a non-square original ``size`` (width, height)."""
    write_synthetic_folder(root, n, 64, seed)
    for folder, resample in (("images", Image.BICUBIC), ("masks", Image.NEAREST)):
        for path in sorted((root / folder).iterdir()):
            Image.open(path).resize(size, resample).save(path)
    return root


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_csv(path: Path) -> list[dict[str, str]]:
    with Path(path).open() as file:
        return list(csv.DictReader(file))


def read_image(path: Path) -> Image.Image:
    """The image at ``path``, fully loaded (the file is closed)."""
    with Image.open(path) as image:
        image.load()
        return image.copy()


def rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
