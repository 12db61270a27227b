"""Output paths of train / evaluate / predict: refused before any work when they cannot or must not be
written, predict never overwriting an input, and one training per run folder (a lock)."""
from __future__ import annotations

from pathlib import Path

import pytest
from train_support import TINY, assert_usage_error, run

from r2unet_fast import evaluate, predict
from r2unet_fast.train.cli import main as train_main


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
