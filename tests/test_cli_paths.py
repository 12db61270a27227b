"""Output paths of train / evaluate / predict: refused before any work when they cannot or must not be
written, predict never overwriting an input, and one training per run folder (a lock)."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_support import TINY, assert_usage_error, python, read_image, rgb, run, subprocess_env

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


# ---- predict: never overwrite an input or a file it did not write -----------------------------------

def _labelled_folder(root: Path) -> Path:
    """``IMD002.png`` with its ground truth ``IMD002_mask.png`` beside it, as in PH2-like layouts."""
    root.mkdir(parents=True)
    Image.fromarray(rgb(40, 30)).save(root / "IMD002.png")
    truth = np.zeros((30, 40), np.uint8)
    truth[5:20, 10:30] = 255
    Image.fromarray(truth).save(root / "IMD002_mask.png")
    return root


def test_predict_into_its_input_folder_keeps_the_ground_truth(tiny_run: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    folder = _labelled_folder(tmp_path / "gt")
    truth = (folder / "IMD002_mask.png").read_bytes()
    code, _, err = run(predict.main, ["--checkpoint", str(tiny_run), str(folder), "--out", str(folder)], capsys)
    assert_usage_error(code, err, str(folder / "IMD002_mask.png"), "--overwrite")
    assert (folder / "IMD002_mask.png").read_bytes() == truth
    assert sorted(p.name for p in folder.iterdir()) == ["IMD002.png", "IMD002_mask.png"], "refused before any work"


def test_predict_overwrite_and_reruns_never_read_their_own_outputs(tiny_run: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder = _labelled_folder(tmp_path / "gt")
    argv = ["--checkpoint", str(tiny_run), str(folder), "--out", str(folder)]
    for _ in range(2):  # the second run finds the first run's masks and overlays in its input folder
        code, stdout, err = run(predict.main, [*argv, "--overwrite"], capsys)
        assert code == 0, err
        assert "wrote 1 masks and overlays" in stdout and "IMD002_mask.png:" not in stdout
    mask = read_image(folder / "IMD002_mask.png")
    assert mask.size == (40, 30) and set(np.unique(np.asarray(mask))) <= {0, 255}
    code, _, err = run(predict.main, argv, capsys)
    assert_usage_error(code, err, "IMD002_mask.png", "IMD002_overlay.png", "--overwrite")


def test_predict_never_writes_over_an_input_even_with_overwrite(tiny_run: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "photos"
    images.mkdir()
    for name in ("a.png", "a_mask.png"):  # a photo that happens to carry predict's output name
        Image.fromarray(rgb(20, 20)).save(images / name)
    before = (images / "a_mask.png").read_bytes()
    code, _, err = run(predict.main, ["--checkpoint", str(tiny_run), str(images / "a.png"), str(images / "a_mask.png"),
                                      "--out", str(images), "--overwrite"], capsys)
    assert_usage_error(code, err, str(images / "a_mask.png"), "input")
    assert (images / "a_mask.png").read_bytes() == before


def test_predict_out_that_is_a_file(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image, taken = tmp_path / "x.png", tmp_path / "taken"
    Image.fromarray(rgb(20, 20)).save(image)
    taken.write_text("mine")
    code, _, err = run(predict.main, ["--checkpoint", str(tiny_run), str(image), "--out", str(taken)], capsys)
    assert_usage_error(code, err, str(taken), "not a folder")
    assert taken.read_text() == "mine"
