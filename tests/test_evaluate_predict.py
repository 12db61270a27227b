"""``python -m r2unet_fast.evaluate`` / ``predict``: original-resolution scoring, per-image CSV, masks, errors."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from data_fixtures import ph2_root
from train_support import (TINY, assert_usage_error, python, read_csv, read_image, read_json, run,
                                subprocess_env, write_folder)

from r2unet_fast import evaluate, predict
from r2unet_fast.data import load_mask
from r2unet_fast.metrics import METRICS, segmentation_metrics
from r2unet_fast.train.cli import main as train_main
from r2unet_fast.train.inference import load_model, predict_probs, resize_probs
from r2unet_fast.train.loaders import build_splits

ORIGINAL = (48, 36)  # width, height of the folder images: not square, not the training size


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("eval")
    data = write_folder(base / "data", 20, ORIGINAL)
    out = base / "run"
    assert train_main([*TINY, "--epochs", "2", "--dataset", "folder", "--data", str(data), "--cache-dir",
                       str(base / "cache"), "--out", str(out)]) == 0
    return out


def test_evaluate_scores_at_original_resolution(folder_run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "scores.json"
    code, stdout, err = run(evaluate.main, ["--checkpoint", str(folder_run), "--out", str(target)], capsys)
    assert code == 0, err
    summary = read_json(target)
    assert summary["resolution"] == "original" and summary["split"] == "test" and summary["images"] == 4
    rows = read_csv(target.with_suffix(".csv"))
    assert len(rows) == 4 and set(rows[0]) == {"id", *METRICS}
    # Recompute each image by hand: predict at 32 px, resize to 48x36, compare with the original mask.
    model, config, _ = load_model(folder_run / "checkpoints/best.pt", torch.device("cpu"))
    test = build_splits(config, augment=False)["test"]
    for row in rows:
        index = next(i for i, s in enumerate(test.samples) if s.id == row["id"])
        mask = torch.from_numpy(load_mask(test.samples[index].mask_path)).float()
        assert tuple(mask.shape) == (ORIGINAL[1], ORIGINAL[0])
        probs = resize_probs(predict_probs(model, test[index]["image"][None], torch.device("cpu"))[0], *mask.shape)
        expected = segmentation_metrics(probs[None, None], mask[None, None])
        for name in METRICS:
            assert float(row[name]) == pytest.approx(expected[name], abs=1e-9), name
    assert float(np.mean([float(r["jaccard"]) for r in rows])) == pytest.approx(summary["metrics"]["jaccard"])


def test_evaluate_tta_all_split_and_default_location(folder_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = run(evaluate.main, ["--checkpoint", str(folder_run), "--split", "all", "--tta"], capsys)
    assert code == 0, err
    summary = read_json(folder_run / "eval" / "folder-all.json")
    assert summary["images"] == 20 and summary["tta"] is True
    assert (folder_run / "eval" / "folder-all.csv").is_file()


def test_evaluate_synthetic_at_generated_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert run(train_main, [*TINY, "--out", str(out)], capsys)[0] == 0
    code, _, err = run(evaluate.main, ["--checkpoint", str(out / "checkpoints/last.pt"), "--split", "val",
                                       "--out", str(tmp_path / "e.json")], capsys)
    assert code == 0, err
    summary = read_json(tmp_path / "e.json")
    assert summary["resolution"] == "generated 32x32" and summary["images"] == 6


def test_python_dash_m_evaluate(folder_run: Path, tmp_path: Path) -> None:
    done = subprocess.run([python(), "-m", "r2unet_fast.evaluate", "--checkpoint", str(folder_run), "--out",
                           str(tmp_path / "s.json")], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "s.csv").is_file()


def test_predict_writes_mask_and_overlay_at_original_size(folder_run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    images = sorted((folder_run.parent / "data" / "images").iterdir())
    single = tmp_path / "big.png"
    Image.open(images[0]).resize((70, 50)).save(single)
    code, stdout, err = run(predict.main, ["--checkpoint", str(folder_run), str(images[1]), str(single), "--tta",
                                           "--out", str(tmp_path / "pred")], capsys)
    assert code == 0, err
    for stem, size in ((images[1].stem, ORIGINAL), ("big", (70, 50))):
        mask = read_image(tmp_path / "pred" / f"{stem}_mask.png")
        assert mask.size == size and set(np.unique(np.asarray(mask))) <= {0, 255}
        overlay = read_image(tmp_path / "pred" / f"{stem}_overlay.png")
        assert overlay.size == size and overlay.mode == "RGB"
    assert "wrote 2 masks and overlays" in stdout


def test_predict_overlay_outlines_the_lesion() -> None:
    image = np.full((9, 9, 3), 100, np.uint8)
    mask = np.zeros((9, 9), np.uint8)
    mask[2:7, 2:7] = 1
    result = predict.overlay(image, mask)
    assert (result[0, 0] == 100).all()
    assert (result[2, 2] == predict.OUTLINE).all()
    assert result[4, 4, 0] > 100 and result[4, 4, 1] < 100


def test_real_ph2_layout_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = ph2_root()
    if root is None:
        pytest.skip("PH2 data not found ($R2UNET_FAST_PH2 or <repo>/../shared/data/ph2)")
    out = tmp_path / "run"
    code, _, err = run(train_main, [*TINY, "--dataset", "ph2", "--data", str(root), "--cache-dir",
                                    str(tmp_path / "cache"), "--out", str(out)], capsys)
    assert code == 0, err
    code, _, err = run(evaluate.main, ["--checkpoint", str(out), "--out", str(tmp_path / "ph2.json")], capsys)
    assert code == 0, err
    summary = read_json(tmp_path / "ph2.json")
    assert summary["images"] == 30 and summary["resolution"] == "original"


@pytest.mark.parametrize("command", [evaluate.main, predict.main])
def test_missing_checkpoint(command, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.pt"
    extra = [str(tmp_path)] if command is predict.main else []
    code, _, err = run(command, ["--checkpoint", str(missing), *extra], capsys)
    assert_usage_error(code, err, str(missing), "does not exist")


def test_foreign_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"\x00garbage")
    code, _, err = run(evaluate.main, ["--checkpoint", str(bogus)], capsys)
    assert_usage_error(code, err, str(bogus))
    torch.save({"weights": torch.zeros(1)}, bogus)
    code, _, err = run(evaluate.main, ["--checkpoint", str(bogus)], capsys)
    assert_usage_error(code, err, "not an r2unet_fast.train checkpoint")


def test_predict_bad_images(folder_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grey = tmp_path / "grey.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(grey)
    code, _, err = run(predict.main, ["--checkpoint", str(folder_run), str(grey), "--out", str(tmp_path / "p")],
                       capsys)
    assert_usage_error(code, err, str(grey), "grayscale")
    code, _, err = run(predict.main, ["--checkpoint", str(folder_run), str(tmp_path / "absent.jpg")], capsys)
    assert_usage_error(code, err, "absent.jpg", "does not exist")


def _doctored(folder_run: Path, tmp_path: Path, change) -> Path:
    """A copy of the run's best checkpoint with ``change(state["model"])`` applied."""
    state = torch.load(folder_run / "checkpoints/best.pt", weights_only=True)
    change(state["model"])
    path = tmp_path / "doctored.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_checkpoint_with_nonfinite_weights_is_refused_naming_the_layer(
        command, folder_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def poison(model: dict) -> None:
        model["head.weight"].view(-1)[0] = float("nan")

    path = _doctored(folder_run, tmp_path, poison)
    image = sorted((folder_run.parent / "data" / "images").iterdir())[0]
    argv = (["--checkpoint", str(path), "--split", "val"] if command == "evaluate"
            else ["--checkpoint", str(path), str(image), "--out", str(tmp_path / "p")])
    code, _, err = run({"evaluate": evaluate.main, "predict": predict.main}[command], argv, capsys)
    assert_usage_error(code, err, "non-finite weights in head.weight")


@pytest.mark.parametrize("change, needle", [
    (lambda m: m.pop("head.bias"), "lacks head.bias"),
    (lambda m: m.__setitem__("head.weight", torch.zeros(2, 4, 1, 1)), "head.weight has shape (2, 4, 1, 1)"),
    (lambda m: m.__setitem__("extra.weight", torch.zeros(1)), "it has extra.weight"),
], ids=["missing", "shape", "extra"])
def test_weights_that_do_not_fit_name_the_first_mismatched_layer(
        change, needle, folder_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _doctored(folder_run, tmp_path, change)
    code, _, err = run(evaluate.main, ["--checkpoint", str(path), "--split", "val"], capsys)
    assert_usage_error(code, err, "does not fit the model", needle)
