"""``python -m r2unet_fast.train``: a tiny real run, its outputs, config precedence and bad input."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_support import (TINY, assert_usage_error, python, read_csv, read_image, read_json, rgb, run,
                                subprocess_env, write_folder)

from r2unet_fast.metrics import METRICS
from r2unet_fast.train import PRESETS, TrainConfig
from r2unet_fast.train.cli import main
from r2unet_fast.train.config import preset_values, resolve_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "tiny"
    assert main([*TINY, "--epochs", "2", "--out", str(out)]) == 0
    return out


def test_run_folder_has_every_output(tiny_run: Path) -> None:
    for name in ("checkpoints/best.pt", "checkpoints/last.pt", "log.csv", "metrics.json", "curves.png",
                 "predictions.png", "config.json"):
        assert (tiny_run / name).is_file(), name
    assert not list(tiny_run.rglob("*.tmp")), "atomic writes must not leave temporaries"
    metrics = read_json(tiny_run / "metrics.json")
    for part in ("val", "test"):
        assert set(metrics[part]) == set(METRICS)
        assert all(0.0 <= v <= 1.0 for v in metrics[part].values())
    rows = read_csv(tiny_run / "log.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for column in ("train_loss", "val_jaccard", "lr", "seconds", "images_per_s", "peak_memory_mb", "data_wait_share"):
        assert float(rows[-1][column]) >= 0, column
    assert list(rows[0])[-1] == "data_wait_share", "new columns go last, so positional readers keep working"
    assert float(rows[-1]["data_wait_share"]) <= 1
    assert read_json(tiny_run / "config.json")["image_size"] == 32
    assert read_image(tiny_run / "predictions.png").size[0] > 100


def test_checkpoint_carries_state_and_loads_weights_only(tiny_run: Path) -> None:
    state = torch.load(tiny_run / "checkpoints/last.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "rng", "config", "best", "history"):
        assert key in state, key
    assert state["epoch"] == 2 and state["config"]["base_channels"] == 4
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    best = torch.load(tiny_run / "checkpoints/best.pt", weights_only=True)
    assert best["epoch"] == read_json(tiny_run / "metrics.json")["best_epoch"]


def test_python_dash_m_runs_and_says_where_outputs_went(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = subprocess.run([python(), "-m", "r2unet_fast.train", *TINY, "--out", str(out)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"outputs in {out}" in done.stdout
    assert (out / "metrics.json").is_file()


def test_config_file_then_flags_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"lr": 0.01, "image_size": 64, "base_channels": 6, "pos_weight": 2.5}))
    resolved = resolve_config(json.loads(config.read_text()), {"image_size": 32})
    assert (resolved.lr, resolved.image_size, resolved.base_channels, resolved.pos_weight) == (0.01, 32, 6, 2.5)
    out = tmp_path / "run"
    code, _, err = run(main, [*TINY, "--config", str(config), "--lr", "0.002", "--out", str(out)], capsys)
    assert code == 0, err
    saved = read_json(out / "config.json")
    assert (saved["lr"], saved["base_channels"], saved["pos_weight"]) == (0.002, 4, 2.5)
    toml = tmp_path / "settings.toml"
    toml.write_text('lr = 0.02\nblock = "conv"\n')
    code, _, err = run(main, [*TINY, "--config", str(toml), "--out", str(tmp_path / "toml")], capsys)
    assert code == 0, err
    assert read_json(tmp_path / "toml" / "config.json")["block"] == "conv"


def test_print_config_shows_the_resolved_settings(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(main, ["--preset", "ph2-cpu", "--lr", "0.001", "--print-config"], capsys)
    assert code == 0, err
    settings = json.loads(out)
    assert (settings["dataset"], settings["image_size"], settings["lr"]) == ("ph2", 128, 0.001)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_resolve(preset: str) -> None:
    values = preset_values(preset)
    config = resolve_config(None, {"preset": preset})
    for key, value in values.items():
        assert getattr(config, key) == (tuple(value) if isinstance(value, list) else value)
    assert resolve_config(None, {}).preset == TrainConfig().preset == "cpu-demo"


def test_paper_and_64_channel_presets_pin_the_model() -> None:
    wide = resolve_config(None, {"preset": "r2attunet-64"})
    assert (wide.base_channels, wide.depth, wide.t, wide.block) == (64, 5, 2, "r2")
    paper = resolve_config(None, {"preset": "paper"})
    assert (paper.dataset, paper.split, paper.base_channels, paper.depth, paper.t) == ("isic2017", "alom", 16, 5, 2)


def test_bf16_autocast_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, stdout, err = run(main, [*TINY, "--synthetic-sizes", "4", "2", "2", "--amp", "--out", str(out)], capsys)
    assert code == 0, err
    assert "bf16 autocast on CPU" in stdout
    assert read_json(out / "config.json")["amp"] == "bf16"
    assert all(0.0 <= v <= 1.0 for v in read_json(out / "metrics.json")["test"].values())


# ---- bad input: exit 2, one line, naming the culprit ------------------------------------------------

def _folder_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], root: Path) -> tuple[int, str]:
    code, _, err = run(main, [*TINY, "--dataset", "folder", "--data", str(root), "--cache-dir",
                              str(tmp_path / "cache"), "--out", str(tmp_path / "out")], capsys)
    return code, err


def test_unreadable_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_folder(tmp_path / "d", 6)
    (root / "images" / "syn_0002.png").write_bytes(b"not a png at all")
    assert_usage_error(*_folder_error(tmp_path, capsys, root), "syn_0002.png")


def test_image_that_fails_to_decode_inside_a_worker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_folder(tmp_path / "d", 6)
    path = root / "images" / "syn_0005.png"
    path.write_bytes(path.read_bytes()[:120])  # header intact, pixel data cut short
    code, _, err = run(main, [*TINY, "--workers", "1", "--dataset", "folder", "--data", str(root), "--cache-dir",
                              str(tmp_path / "cache"), "--out", str(tmp_path / "out")], capsys)
    assert_usage_error(code, err, "syn_0005.png")
    assert "Traceback" not in err


def test_missing_mask(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_folder(tmp_path / "d", 6)
    (root / "masks" / "syn_0003.png").unlink()
    assert_usage_error(*_folder_error(tmp_path, capsys, root), "syn_0003", "mask")


def test_size_mismatched_mask(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_folder(tmp_path / "d", 6)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "syn_0001.png")
    assert_usage_error(*_folder_error(tmp_path, capsys, root), "syn_0001.png", "10x10")


def test_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    assert_usage_error(*_folder_error(tmp_path, capsys, root), str(root / "images"))


def test_wrong_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "d"
    root.mkdir()
    Image.fromarray(rgb(8, 8)).save(root / "a.png")
    assert_usage_error(*_folder_error(tmp_path, capsys, root), str(root / "images"))


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_or_rgba_image(tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str) -> None:
    root = write_folder(tmp_path / "d", 6)
    path = root / "images" / "syn_0004.png"
    Image.open(path).convert(mode).save(path)
    assert_usage_error(*_folder_error(tmp_path, capsys, root), "syn_0004.png", mode)


def test_file_dataset_without_data(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("R2UNET_FAST_PH2", raising=False)
    for dataset in ("folder", "ph2"):
        code, _, err = run(main, [*TINY, "--dataset", dataset, "--out", str(tmp_path / "o")], capsys)
        assert_usage_error(code, err, f"--dataset {dataset} needs --data")


def test_image_size_not_divisible_names_nearest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(main, [*TINY, "--depth", "4", "--image-size", "100", "--out", str(tmp_path / "o")], capsys)
    assert_usage_error(code, err, "--image-size 100", "divisible by 8", "nearest valid size is 96")


@pytest.mark.parametrize("argv, needles", [
    (["--resume", "no/such/run.pt"], ("no/such/run.pt", "does not exist")),
    (["--epochs", "zero"], ("--epochs", "invalid int")),
    (["--pos-weight", "-3"], ("--pos-weight",)),
    (["--config", "no/such.json"], ("no/such.json",)),
    (["--amp", "fp16", "--device", "cpu"], ("fp16", "CUDA")),
    (["--dataset", "synthetic", "--data", "x"], ("drop --data",)),
    (["--split", "all"], ("--split all",)),
    (["--seed", "-1"], ("--seed", "-1", "4294967295")),
    (["--seed", str(2**32)], ("--seed", "4294967296")),
    (["--lr", "inf"], ("--lr", "finite")),
    (["--min-lr-ratio", "5"], ("--min-lr-ratio", "[0, 1]")),
])
def test_bad_values(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                    needles: tuple[str, ...]) -> None:
    code, _, err = run(main, [*TINY, *argv, "--out", str(tmp_path / "o")], capsys)
    assert_usage_error(code, err, *needles)


def test_unknown_config_key_suggests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.json"
    config.write_text('{"learning_rate": 0.1, "epoch": 3}')
    code, _, err = run(main, [*TINY, "--config", str(config)], capsys)
    assert_usage_error(code, err, str(config), "'learning_rate'")
    config.write_text('{"epoch": 3}')
    code, _, err = run(main, [*TINY, "--config", str(config)], capsys)
    assert_usage_error(code, err, "did you mean 'epochs'")


def test_refuses_to_overwrite_a_run(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(main, [*TINY, "--out", str(tiny_run)], capsys)
    assert_usage_error(code, err, "already holds a run", "--resume")
