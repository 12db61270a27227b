"""DDP: ``torchrun --nproc_per_node 2`` on CPU (gloo) trains, reduces metrics over ranks, writes once."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from train_support import TINY, assert_usage_error, free_port, python, read_csv, read_json, run, subprocess_env

from r2unet_fast import R2AttUNet, evaluate
from r2unet_fast.metrics import METRICS
from r2unet_fast.train.cli import main


def test_two_cpu_processes_with_gloo(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    # 13 validation images: the shards are unequal (7 + 6), so a sum over ranks is needed to count each once.
    command = [python(), "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "r2unet_fast.train", *TINY, "--synthetic-sizes", "16", "13",
               "5", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("epoch 1/1") == 1, "only rank 0 prints"
    assert "cpu x2" in done.stdout
    metrics = read_json(out / "metrics.json")
    assert set(metrics["val"]) == set(METRICS) and set(metrics["test"]) == set(METRICS)
    rows = read_csv(out / "log.csv")
    assert len(rows) == 1
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert not any(key.startswith("module.") for key in state["model"]), "checkpoints hold the unwrapped model"
    # One process scoring all 13 validation images must agree with the two ranks' reduced metrics.
    target = tmp_path / "val.json"
    assert evaluate.main(["--checkpoint", str(out), "--split", "val", "--out", str(target)]) == 0
    single = read_json(target)
    assert single["images"] == 13
    for name in METRICS:
        assert single["metrics"][name] == pytest.approx(metrics["val"][name], rel=1e-12, abs=1e-12), name


def test_one_process_under_torchrun_takes_the_ddp_path(tmp_path: Path) -> None:
    out = tmp_path / "ddp1"
    command = [python(), "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "r2unet_fast.train", *TINY, "--device", "cpu",
               "--out", str(out)]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cpu x1 (DDP, gloo)" in done.stdout
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in state["model"])


def test_validation_scores_the_checkpointed_model_on_every_rank(tmp_path: Path) -> None:
    # Two epochs, so BatchNorm running statistics diverge across ranks during the second; the log's
    # validation metrics of the best epoch must be those of best.pt, re-scored by one process.
    out = tmp_path / "ddp"
    command = [python(), "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "r2unet_fast.train", *TINY, "--epochs", "2",
               "--synthetic-sizes", "16", "13", "5", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    best = read_json(out / "metrics.json")["best_epoch"]
    row = next(r for r in read_csv(out / "log.csv") if int(r["epoch"]) == best)
    target = tmp_path / "val.json"
    assert evaluate.main(["--checkpoint", str(out), "--split", "val", "--out", str(target)]) == 0
    rescored = read_json(target)["metrics"]
    for name in METRICS:
        # equal up to the order of float64 sums (two ranks' partial sums vs one running sum)
        assert float(row[f"val_{name}"]) == pytest.approx(rescored[name], rel=1e-12, abs=1e-12), name


def test_synchronized_batchnorm_matches_one_process_on_the_whole_batch() -> None:
    command = [python(), "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(Path(__file__).with_name("sync_bn_worker.py"))]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "synchronized BatchNorm matches one process on the whole batch" in done.stdout


def test_sync_bn_run_records_it_and_keeps_plain_checkpoint_keys(tmp_path: Path) -> None:
    out = tmp_path / "sync"
    command = [python(), "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "r2unet_fast.train", *TINY, "--synthetic-sizes", "16", "6",
               "4", "--device", "cpu", "--sync-bn", "--out", str(out)]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SyncBatchNorm" in done.stdout
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert state["config"]["sync_bn"] is True
    plain = R2AttUNet(base_channels=4, depth=3).state_dict()
    assert list(state["model"]) == list(plain), "SyncBatchNorm keeps BatchNorm2d's parameters and buffers"
    # the setting comes back with the run: resumed under torchrun it synchronizes again ...
    command = [python(), "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "r2unet_fast.train", "--resume", str(out), "--epochs", "2"]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SyncBatchNorm" in done.stdout and "resuming after epoch 1" in done.stdout
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["config"]["sync_bn"] is True
    # ... and a resume without torchrun is refused, as a fresh run would be
    done = subprocess.run([python(), "-m", "r2unet_fast.train", "--resume", str(out), "--epochs", "3"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--sync-bn" in done.stderr, done.stderr


def test_sync_bn_without_torchrun_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(main, [*TINY, "--device", "cpu", "--sync-bn", "--out", str(tmp_path / "run")], capsys)
    assert_usage_error(code, err, "--sync-bn", "torchrun")
    assert not (tmp_path / "run").exists(), "refused before a run folder is made"


def test_evaluate_under_torchrun_says_it_runs_in_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run(evaluate.main, ["--checkpoint", str(tmp_path), "--split", "val"], capsys)
    assert_usage_error(code, err, "one process", "without torchrun")
