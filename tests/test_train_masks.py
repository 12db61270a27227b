"""Training refuses mostly-empty masks and reads coloured ones (issue #16 item 3)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_support import TINY, assert_usage_error, run, write_folder

from r2unet_fast.data import sample_splits
from r2unet_fast.train.cli import main

SIZE = (40, 30)


def _empty_masks(root: Path, ids: list[str]) -> None:
    for case_id in ids:
        Image.fromarray(np.zeros(SIZE[::-1], np.uint8)).save(root / "masks" / f"{case_id}.png")


def _train(tmp_path: Path, root: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    return run(main, [*TINY, "--dataset", "folder", "--data", str(root), "--cache-dir", str(tmp_path / "cache"),
                      "--out", str(tmp_path / "run"), *extra], capsys)


def test_training_on_mostly_empty_masks_is_an_error_naming_count_and_files(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_folder(tmp_path / "d", 10, SIZE)
    train = [s.id for s in sample_splits("folder", root, split="seeded")["train"]]
    _empty_masks(root, train[:4])  # 4 of 7: more than half
    code, _, err = _train(tmp_path, root, capsys)
    first = root / "masks" / f"{sorted(train[:4])[0]}.png"
    assert_usage_error(code, err, "4 of 7 training masks are empty", str(first))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_red_on_black_masks_train_as_lesions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_folder(tmp_path / "d", 10, SIZE)
    for path in (root / "masks").iterdir():  # 0/255 grey -> red lesion on black, as drawn in an editor
        grey = np.asarray(Image.open(path))
        red = np.zeros((*grey.shape, 3), np.uint8)
        red[..., 0] = grey
        Image.fromarray(red).save(path)
    code, stdout, err = _train(tmp_path, root, capsys, "--pos-weight", "auto")
    assert code == 0, err  # read as grey (red is level 76 < 127) they were empty: auto had no lesion to count
    ratio = float(stdout.split("background/lesion pixel ratio of the training masks = ")[1].split()[0])
    assert 1.0 < ratio < 20.0 and "empty" not in stdout


def test_a_few_empty_masks_are_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_folder(tmp_path / "d", 10, SIZE)
    train = [s.id for s in sample_splits("folder", root, split="seeded")["train"]]
    _empty_masks(root, train[:1])
    code, stdout, err = _train(tmp_path, root, capsys)
    assert code == 0, err
    assert f"note: 1 of 7 training masks are empty (no lesion pixel at 32 px), e.g. {root / 'masks'}" in stdout
