"""Kill-and-resume gives the uninterrupted result bit for bit (CPU); NaN stops keep the last good checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_support import TINY, assert_usage_error, read_csv, read_json, run

from r2unet_fast.train.cli import main
from r2unet_fast.train.trainer import Trainer

# Bit-identical resume is a CPU promise: on CUDA, cuDNN autotuning picks kernels per process.
THREE_EPOCHS = [*TINY, "--epochs", "3", "--seed", "7", "--device", "cpu"]


def _weights(out: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / name, weights_only=True)["model"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _kill_at(monkeypatch: pytest.MonkeyPatch, epoch: int, step: int) -> None:
    """Make train_step raise KeyboardInterrupt (like Ctrl-C or a kill) at (epoch, step), 0-based."""
    original = Trainer.train_step

    def train_step(self: Trainer, batch: dict, e: int, s: int) -> float:
        if (e, s) == (epoch, step):
            raise KeyboardInterrupt
        return original(self, batch, e, s)

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    assert main([*THREE_EPOCHS, "--out", str(out)]) == 0
    return out


def test_resume_after_kill_mid_epoch_is_bit_identical(uninterrupted: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _kill_at(patch, epoch=1, step=1)
        code, stdout, _ = run(main, [*THREE_EPOCHS, "--out", str(out)], capsys)
    assert code == 130 and f"--resume {out}" in stdout
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["epoch"] == 1
    code, stdout, err = run(main, ["--resume", str(out)], capsys)
    assert code == 0, err
    assert "resuming after epoch 1" in stdout
    _assert_same_weights(_weights(out), _weights(uninterrupted))
    _assert_same_weights(_weights(out, "best.pt"), _weights(uninterrupted, "best.pt"))
    assert read_json(out / "metrics.json")["test"] == read_json(uninterrupted / "metrics.json")["test"]
    epochs = [int(row["epoch"]) for row in read_csv(out / "log.csv")]
    assert epochs == [1, 2, 3]


def test_resume_from_checkpoint_file_extends_epochs(uninterrupted: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert run(main, [*TINY, "--out", str(out)], capsys)[0] == 0
    code, _, err = run(main, ["--resume", str(out / "checkpoints/last.pt"), "--epochs", "2"], capsys)
    assert code == 0, err
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["config"]["epochs"] == 2
    assert len(state["history"]) == 2


def test_resume_refuses_to_change_the_run(uninterrupted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(main, ["--resume", str(uninterrupted), "--lr", "0.5"], capsys)
    assert_usage_error(code, err, "--lr cannot change on --resume")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    original = Trainer.compute_loss

    def compute_loss(self: Trainer, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        loss = original(self, logits, masks)
        # Poison training steps of the second epoch only (validation runs under no_grad).
        return loss * float("nan") if self.epoch == 1 and torch.is_grad_enabled() else loss

    monkeypatch.setattr(Trainer, "compute_loss", compute_loss)
    out = tmp_path / "run"
    code, _, err = run(main, [*THREE_EPOCHS, "--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert "loss is nan at epoch 2, step 1" in lines[0] and str(out / "checkpoints/last.pt") in lines[0]
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (out / "metrics.json").exists()


def test_early_stopping_and_resuming_a_stopped_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    original = Trainer.validate

    def flat_validate(self: Trainer, loader) -> dict[str, float]:
        return {**original(self, loader), "jaccard": 0.5}  # never improves after the first epoch

    monkeypatch.setattr(Trainer, "validate", flat_validate)
    out = tmp_path / "run"
    code, stdout, err = run(main, [*TINY, "--epochs", "5", "--patience", "2", "--out", str(out)], capsys)
    assert code == 0, err
    assert "early stopping" in stdout
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["epoch"] == 3
    assert read_json(out / "metrics.json")["best_epoch"] == 1
    code, stdout, err = run(main, ["--resume", str(out)], capsys)
    assert code == 0 and "epoch 4/5" not in stdout, stdout
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["epoch"] == 3


def test_sigterm_stops_like_ctrl_c_and_says_how_to_resume(tmp_path: Path) -> None:
    import signal
    import subprocess

    from train_support import python, subprocess_env

    out = tmp_path / "run"
    process = subprocess.Popen([python(), "-m", "r2unet_fast.train", *TINY, "--epochs", "200", "--device", "cpu",
                                "--out", str(out)], env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:  # the first finished epoch: a checkpoint to resume from exists
            if line.startswith("epoch 1/200"):
                break
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert f"continue with: python -m r2unet_fast.train --resume {out}" in stdout
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["epoch"] >= 1
