"""Trainer building blocks: --pos-weight auto, LR schedule, the fused optimizer, atomic writes, RNG
capture, sharding."""
from __future__ import annotations

import copy
import random
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_support import TINY, read_csv, rgb, run

from r2unet_fast.files import atomic_write
from r2unet_fast.train.checkpoint import capture_rng, restore_rng
from r2unet_fast.train.cli import main
from r2unet_fast.train.config import TrainConfig
from r2unet_fast.train.distributed import DistContext, ShardSampler, launched_by_torchrun
from r2unet_fast.train.census import positive_weight
from r2unet_fast.train.loaders import build_splits
from r2unet_fast.train.optim import build_optimizer, parameter_groups, warmup_cosine
from r2unet_fast.train.trainer import Trainer


def _quarter_lesion_folder(root: Path, n: int = 10, size: int = 32) -> Path:
    """Every mask is exactly one quarter lesion (the top-left block), so background/lesion = 3."""
    mask = np.zeros((size, size), np.uint8)
    mask[: size // 2, : size // 2] = 255
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rgb(size, size, i)).save(root / "images" / f"case{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"case{i:02d}.png")
    return root


def test_pos_weight_auto_is_background_over_lesion(tmp_path: Path) -> None:
    root = _quarter_lesion_folder(tmp_path / "d")
    config = TrainConfig(dataset="folder", data=str(root), image_size=32, cache_dir=str(tmp_path / "cache"))
    train = build_splits(config, augment=False)["train"]
    assert positive_weight(train, DistContext(), batch_size=3, workers=0) == pytest.approx(3.0, abs=1e-12)


def test_pos_weight_auto_reaches_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _quarter_lesion_folder(tmp_path / "d")
    out = tmp_path / "run"
    code, stdout, err = run(main, [*TINY, "--dataset", "folder", "--data", str(root), "--pos-weight", "auto",
                                   "--cache-dir", str(tmp_path / "cache"), "--out", str(out)], capsys)
    assert code == 0, err
    assert "ratio of the training masks = 3.0000" in stdout
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["pos_weight"] == pytest.approx(3.0)


def test_warmup_then_cosine() -> None:
    factors = [warmup_cosine(step, warmup_steps=4, total_steps=20, min_ratio=0.1) for step in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert factors[20] == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["adamw", "adam"])
def test_optimizer_is_fused_and_steps_like_the_per_parameter_one(kind: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    twin = copy.deepcopy(model)
    config = TrainConfig(optimizer=kind, lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(model, config)
    assert all(group["fused"] for group in fused.param_groups)
    per_param = type(fused)(parameter_groups(twin, config.weight_decay), lr=config.lr, foreach=False)
    for _ in range(3):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        per_param.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def broken(file) -> None:
        file.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_rng_capture_round_trip(tmp_path: Path) -> None:
    state = capture_rng()
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(torch.load(path, weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_shard_sampler_covers_each_item_once() -> None:
    shards = [list(ShardSampler(13, rank, 3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(13))


def test_tensorboard_used_when_importable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    scalars: list[tuple[str, float, int]] = []

    class FakeWriter:
        def __init__(self, log_dir: str) -> None:
            self.log_dir = log_dir

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            scalars.append((tag, value, step))

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    code, _, err = run(main, [*TINY, "--epochs", "2", "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    tags = {tag for tag, _, _ in scalars}
    assert {"train/loss", "val/loss", "val/jaccard", "run/lr", "run/peak_memory_mb", "run/data_wait_share"} <= tags
    assert {step for _, _, step in scalars} == {1, 2}


def test_data_wait_share_sees_a_slow_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    class Slow(torch.utils.data.Dataset):
        def __init__(self, inner: torch.utils.data.Dataset) -> None:
            self.inner = inner

        def __len__(self) -> int:
            return len(self.inner)

        def __getitem__(self, index: int) -> dict:
            time.sleep(0.05)
            return self.inner[index]

    original = Trainer.build_datasets

    def slow_train_set(self: Trainer) -> dict:
        datasets = original(self)
        return {**datasets, "train": Slow(datasets["train"])}

    monkeypatch.setattr(Trainer, "build_datasets", slow_train_set)
    out = tmp_path / "run"
    code, stdout, err = run(main, [*TINY, "--out", str(out)], capsys)
    assert code == 0, err
    share = float(read_csv(out / "log.csv")[0]["data_wait_share"])
    assert 0.5 < share <= 1.0, share  # 12 images x 50 ms of loading against a tiny model's steps
    assert "data wait" in stdout


def test_train_step_phases_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[str] = []
    original = Trainer.phase

    def phase(self: Trainer, name: str):
        seen.append(name)
        return original(self, name)

    monkeypatch.setattr(Trainer, "phase", phase)
    code, _, err = run(main, [*TINY, "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert seen == ["to_device", "forward", "loss", "backward", "optimizer"] * 3  # 12 images, batch 4


def test_launched_by_torchrun_needs_the_rendezvous_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not launched_by_torchrun()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert launched_by_torchrun(), "one process under torchrun still takes the DDP path"
    assert not DistContext().enabled and DistContext(backend="gloo").enabled
