"""Output paths of train / evaluate / predict: refused before any work when they cannot or must not be
written, predict never overwriting an input, and one training per run folder (a lock)."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from train_support import TINY, assert_usage_error, python, run, subprocess_env

from r2unet_fast import evaluate, predict
from r2unet_fast.train.cli import main as train_main

# A folder no user can write to, root included: procfs refuses new files to everyone.
UNWRITABLE = Path("/proc/r2unet-fast-test")
needs_proc = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (unwritable even for root)")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("paths") / "run"
    assert train_main([*TINY, "--out", str(out)]) == 0
    return out


def _must_not_run(*args, **kwargs):
    raise AssertionError("the command did its work before checking where the output goes")


# ---- inputs that are not what they claim: one error line, not a traceback -----------------------------

def test_resume_of_a_text_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello world\n")
    code, _, err = run(train_main, ["--resume", str(notes)], capsys)
    assert_usage_error(code, err, str(notes), "not written by r2unet_fast.train")


def test_binary_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "settings.json"
    config.write_bytes(bytes(range(256)) * 4)
    code, _, err = run(train_main, [*TINY, "--config", str(config), "--out", str(tmp_path / "o")], capsys)
    assert_usage_error(code, err, str(config), "not a text file")


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_checkpoint_that_is_a_text_file(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello world\n")
    argv = ["--checkpoint", str(notes)] + ([str(notes)] if command == "predict" else [])
    code, _, err = run({"evaluate": evaluate.main, "predict": predict.main}[command], argv, capsys)
    assert_usage_error(code, err, str(notes), "not written by r2unet_fast.train")


# ---- train ---------------------------------------------------------------------------------------------

def _read_only_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("running as root, which ignores folder permissions; the /proc case covers unwritable folders")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.mark.parametrize("where", ["existing file", "read-only folder", "under /proc"])
def test_train_out_that_cannot_be_written(where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if where == "existing file":
        out = tmp_path / "taken"
        out.write_text("mine")
        needles = (str(out), "is a file")
    elif where == "read-only folder":
        out = _read_only_folder(tmp_path) / "run"
        needles = (str(out), "cannot write")
    else:
        if not Path("/proc/self").is_dir():
            pytest.skip("needs Linux /proc")
        out = UNWRITABLE / "run"
        needles = (str(out), "cannot write", "/proc")
    monkeypatch.setattr("r2unet_fast.train.cli.Trainer", _must_not_run)
    try:
        code, _, err = run(train_main, [*TINY, "--out", str(out)], capsys)
    finally:
        if where == "read-only folder":
            out.parent.chmod(0o755)
    assert_usage_error(code, err, *needles)
    if where == "existing file":
        assert out.read_text() == "mine"


# ---- one training per run folder -----------------------------------------------------------------------

def _start_long_training(out: Path) -> subprocess.Popen:
    """A real training into ``out`` that runs until killed; returns once its first epoch is saved."""
    process = subprocess.Popen([python(), "-m", "r2unet_fast.train", *TINY, "--epochs", "100000", "--out", str(out)],
                               env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, seen = time.monotonic() + 240, []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        seen.append(line)
        if line.startswith("epoch 1/") or not line:
            break
    if not seen[-1].startswith("epoch 1/"):
        process.kill()
        pytest.fail("the background training did not finish an epoch: " + "".join(seen)[-2000:])
    return process


def test_one_training_per_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "busy"
    holder = _start_long_training(out)
    try:
        code, _, err = run(train_main, [*TINY, "--out", str(out)], capsys)
        assert_usage_error(code, err, str(out), f"PID {holder.pid}")
        # continuing a run that is still training would interleave two writers in one folder
        code, _, err = run(train_main, ["--resume", str(out), "--epochs", "3"], capsys)
        assert_usage_error(code, err, str(out), f"PID {holder.pid}")
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the lock file stays behind
        holder.stdout.close()
        holder.wait(timeout=60)
    assert (out / ".lock").exists()
    epoch = torch.load(out / "checkpoints/last.pt", weights_only=True)["epoch"]
    code, stdout, err = run(train_main, ["--resume", str(out), "--epochs", str(epoch + 1)], capsys)
    assert code == 0, err  # the OS dropped the dead process's lock: a stale lock file does not block
    assert f"resuming after epoch {epoch}" in stdout


# ---- evaluate ------------------------------------------------------------------------------------------

def test_evaluate_out_that_is_a_folder_fails_before_scoring(tiny_run: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    monkeypatch.setattr(evaluate, "score", _must_not_run)
    code, _, err = run(evaluate.main, ["--checkpoint", str(tiny_run), "--split", "val", "--out", str(folder)], capsys)
    assert_usage_error(code, err, str(folder), "is a folder")


@needs_proc
def test_evaluate_out_in_an_unwritable_folder(tiny_run: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluate, "score", _must_not_run)
    code, _, err = run(evaluate.main, ["--checkpoint", str(tiny_run), "--out", str(UNWRITABLE / "e.json")], capsys)
    assert_usage_error(code, err, str(UNWRITABLE / "e.json"), "cannot write")
