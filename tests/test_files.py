"""Atomic writes: outputs people can share (the umask, not 0600), and no temporaries left behind."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from train_support import TINY, run

from r2unet_fast.files import atomic_write_text, remove_stale_temporaries
from r2unet_fast.train.cli import main


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_atomic_write_respects_the_umask(tmp_path: Path, umask_022) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "{}\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    os.umask(0o077)
    atomic_write_text(target, "{}\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_run_outputs_are_readable_by_others(tmp_path: Path, umask_022, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, _, err = run(main, [*TINY, "--device", "cpu", "--out", str(out)], capsys)
    assert code == 0, err
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "metrics.json", "log.csv", "curves.png"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


def test_stale_temporaries_of_a_killed_write_are_removed_on_resume(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, _, err = run(main, [*TINY, "--device", "cpu", "--out", str(out)], capsys)
    assert code == 0, err
    leftovers = [out / ".log.csv.abc123.tmp", out / "checkpoints" / ".last.pt.k9x.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    kept = out / "notes.tmp"  # not one of ours: no leading dot
    kept.write_text("mine")
    code, _, err = run(main, ["--resume", str(out), "--epochs", "2"], capsys)
    assert code == 0, err
    assert not any(path.exists() for path in leftovers) and kept.exists()
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["epoch"] == 2


def test_remove_stale_temporaries_touches_only_this_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".x.tmp").write_text("")
    (tmp_path / ".y.pt.1.tmp").write_text("")
    assert remove_stale_temporaries(tmp_path) == [tmp_path / ".y.pt.1.tmp"]
    assert (tmp_path / "sub" / ".x.tmp").exists()
