"""A run's split is fixed at its start (issue #16 item 2) and a run can move (item 4)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from train_support import TINY, assert_usage_error, read_csv, read_json, run, write_folder

from r2unet_fast import evaluate
from r2unet_fast.data import sample_splits
from r2unet_fast.train.cli import main as train_main
from r2unet_fast.train.trainer import Trainer

ORIGINAL = (40, 30)


def _ids(root: Path) -> dict[str, set[str]]:
    """The seeded split (seed 0) of ``root`` as it is now: part -> case ids."""
    return {part: {s.id for s in samples} for part, samples in sample_splits("folder", root, split="seeded").items()}


def _add_cases(root: Path, first: int, count: int, scratch: Path) -> None:
    """Copy ``count`` new synthetic cases syn_<first>... into ``root`` (as if the user added images)."""
    more = write_folder(scratch, first + count, ORIGINAL, seed=1)
    for number in range(first, first + count):
        for folder in ("images", "masks"):
            shutil.copy(more / folder / f"syn_{number:04d}.png", root / folder)


@pytest.fixture
def folder_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path, dict[str, set[str]]]:
    """A 1-epoch run on 20 folder cases: (run folder, data folder, the split it started with)."""
    data = write_folder(tmp_path / "data", 20, ORIGINAL)
    out = tmp_path / "run"
    code, _, err = run(train_main, [*TINY, "--dataset", "folder", "--data", str(data), "--cache-dir",
                                    str(tmp_path / "cache"), "--out", str(out)], capsys)
    assert code == 0, err
    return out, data, _ids(data)


def test_evaluate_scores_the_runs_own_test_cases_after_images_were_added(
        folder_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, data, split = folder_run
    _add_cases(data, 20, 10, tmp_path / "more")
    assert _ids(data)["test"] != split["test"]  # recomputing now would pick other test cases
    code, stdout, err = run(evaluate.main, ["--checkpoint", str(out), "--out", str(tmp_path / "t.json")], capsys)
    assert code == 0, err
    assert {row["id"] for row in read_csv(tmp_path / "t.csv")} == split["test"]
    assert "10 case(s)" in stdout and "left out" in stdout
    stored = read_json(out / "split.json")
    assert {part: set(ids) for part, ids in stored["parts"].items()} == split
    assert stored["data"] == str(data) and len(stored["fingerprint"]) == 16


def test_resume_trains_on_the_runs_own_training_cases_after_images_were_added(
        folder_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out, data, split = folder_run
    _add_cases(data, 20, 10, tmp_path / "more")
    seen: set[str] = set()
    original = Trainer.train_step

    def recording(self: Trainer, batch: dict, epoch: int, step: int) -> float:
        seen.update(batch["id"])
        return original(self, batch, epoch, step)

    monkeypatch.setattr(Trainer, "train_step", recording)
    code, stdout, err = run(train_main, ["--resume", str(out), "--epochs", "2"], capsys)
    assert code == 0, err
    assert seen == split["train"]
    assert "left out" in stdout
    saved = torch.load(out / "checkpoints/last.pt", weights_only=True)["split"]
    assert set(saved["parts"]["val"]) == split["val"]


def test_cases_that_disappeared_are_an_error_naming_them(
        folder_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, data, split = folder_run
    gone = sorted(split["test"])[0]
    (data / "images" / f"{gone}.png").unlink()
    (data / "masks" / f"{gone}.png").unlink()
    code, _, err = run(evaluate.main, ["--checkpoint", str(out), "--out", str(tmp_path / "t.json")], capsys)
    assert_usage_error(code, err, "1 of this run's 20 cases are gone", gone)
    code, _, err = run(train_main, ["--resume", str(out), "--epochs", "2"], capsys)
    assert_usage_error(code, err, gone)


def test_checkpoints_without_a_stored_split_still_load_with_a_warning(
        folder_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, data, split = folder_run
    for name in ("best.pt", "last.pt"):
        state = torch.load(out / "checkpoints" / name, weights_only=True)
        del state["split"]
        torch.save(state, out / "checkpoints" / name)
    code, stdout, err = run(evaluate.main, ["--checkpoint", str(out), "--out", str(tmp_path / "t.json")], capsys)
    assert code == 0, err
    warnings = [line for line in stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "stores no split" in warnings[0]
    assert {row["id"] for row in read_csv(tmp_path / "t.csv")} == split["test"]
    code, stdout, err = run(train_main, ["--resume", str(out), "--epochs", "2"], capsys)
    assert code == 0, err
    assert "stores no split" in stdout
    assert set(torch.load(out / "checkpoints/last.pt", weights_only=True)["split"]["parts"]["test"]) == split["test"]


def test_relative_data_is_stored_absolute_so_the_run_works_from_anywhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    write_folder(tmp_path / "project" / "data", 10, ORIGINAL)
    monkeypatch.chdir(tmp_path / "project")
    out = tmp_path / "run"
    code, _, err = run(train_main, [*TINY, "--dataset", "folder", "--data", "data", "--cache-dir",
                                    str(tmp_path / "cache"), "--out", str(out)], capsys)
    assert code == 0, err
    assert read_json(out / "config.json")["data"] == str(tmp_path / "project" / "data")
    monkeypatch.chdir(tmp_path)
    code, _, err = run(evaluate.main, ["--checkpoint", str(out), "--out", str(tmp_path / "t.json")], capsys)
    assert code == 0, err
    code, _, err = run(train_main, ["--resume", str(out), "--epochs", "2", "--data",
                                    str(tmp_path / "project" / "data")], capsys)
    assert code == 0, err


def test_moved_data_is_accepted_by_fingerprint_and_other_data_is_refused(
        folder_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, data, split = folder_run
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(data, moved, copy_function=shutil.copy)  # a plain copy: new mtimes, same bytes
    shutil.rmtree(data)
    code, _, err = run(evaluate.main, ["--checkpoint", str(out), "--out", str(tmp_path / "t.json")], capsys)
    assert_usage_error(code, err, str(data), "does not exist", "--data")
    code, _, err = run(evaluate.main, ["--checkpoint", str(out), "--data", str(moved), "--out",
                                       str(tmp_path / "t.json")], capsys)
    assert code == 0, err
    assert {row["id"] for row in read_csv(tmp_path / "t.csv")} == split["test"]
    code, _, err = run(train_main, ["--resume", str(out), "--epochs", "2", "--data", str(moved)], capsys)
    assert code == 0, err
    assert read_json(out / "split.json")["data"] == str(moved)
    other = write_folder(tmp_path / "other", 20, ORIGINAL, seed=5)  # same ids, other pictures
    code, _, err = run(evaluate.main, ["--checkpoint", str(out), "--data", str(other), "--out",
                                       str(tmp_path / "o.json")], capsys)
    assert_usage_error(code, err, str(other), "does not hold the data set this run was trained on")
    code, _, err = run(train_main, ["--resume", str(out), "--epochs", "3", "--data", str(other)], capsys)
    assert_usage_error(code, err, "does not hold the data set this run was trained on")
