"""``--compile``: trains through torch.compile, checkpoints stay plain, the maths stays the same."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from train_support import TINY, read_csv, read_json, run

from r2unet_fast.train.checkpoint import config_of
from r2unet_fast.train.cli import main
from r2unet_fast.train.config import TrainConfig, check_resume_overrides

# The smallest model that still has attention gates: compiling it takes ~15-50 s on 2 cores.
SMALL = [*TINY, "--synthetic-sizes", "8", "4", "4", "--depth", "2", "--preview", "0", "--device", "cpu"]


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_run_matches_eager(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    code, _, err = run(main, [*SMALL, "--out", str(eager)], capsys)
    assert code == 0, err
    code, stdout, err = run(main, [*SMALL, "--compile", "--out", str(compiled)], capsys)
    assert code == 0, err
    assert "torch.compile" in stdout and read_json(compiled / "config.json")["compile"] is True
    plain = torch.load(eager / "checkpoints/last.pt", weights_only=True)["model"]
    state = torch.load(compiled / "checkpoints/last.pt", weights_only=True)["model"]
    assert state.keys() == plain.keys(), "no _orig_mod./module. prefixes in checkpoints"
    loss = [float(read_csv(folder / "log.csv")[0]["train_loss"]) for folder in (eager, compiled)]
    # (Not the weights: conv biases before BatchNorm get ~0 gradients, whose sign - and so Adam's step -
    # is rounding noise.)
    assert loss[1] == pytest.approx(loss[0], rel=1e-4, abs=1e-5)
    # --compile does not change what is computed, so a resumed run may switch it (here: off again).
    code, stdout, err = run(main, ["--resume", str(compiled), "--no-compile", "--epochs", "2"], capsys)
    assert code == 0, err
    assert "torch.compile" not in stdout
    assert config_of(torch.load(compiled / "checkpoints/last.pt", weights_only=True)).compile is False


def test_resume_may_change_compile_but_not_the_run() -> None:
    saved = TrainConfig(compile=False)
    assert check_resume_overrides(saved, {"compile": True}).compile is True
    assert check_resume_overrides(TrainConfig(compile=True), {"compile": False}).compile is False


def test_old_checkpoint_configs_default_to_eager() -> None:
    values = TrainConfig().to_dict()
    del values["compile"]  # written before the field existed
    assert TrainConfig.from_dict(values).compile is False
