"""benchmarks/gpu_train.py, the prepared GPU training measurement, run end to end on CPU (--cpu-smoke)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from train_support import REPO, python, subprocess_env

sys.path.insert(0, str(REPO))  # the benchmarks package lives beside the tests, not in the installed package

from benchmarks import gpu_train, make_table, train_runs  # noqa: E402
from r2unet_fast.data.base import Sample  # noqa: E402
from r2unet_fast.data.splits import seeded_split  # noqa: E402


@pytest.mark.slow
def test_cpu_smoke_end_to_end(tmp_path: Path) -> None:
    out, report = tmp_path / "out", tmp_path / "train.json"
    out.mkdir()
    # A compile variant with a prior far over the budget shows the skip; DDP and the profile keep their share.
    command = [python(), "benchmarks/gpu_train.py", "--cpu-smoke", "--out", str(report), "--cache-dir",
               str(tmp_path / "cache"), "--variants", "reference-eager-fp32,fast-eager-fp32,reference-compile-fp32",
               "--budget-s", "120"]
    done = subprocess.run(command, cwd=REPO, env={**subprocess_env(), "OUT": str(out)}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(report.read_text())
    assert data["kind"] == "gpu_train" and data["device"] == "cpu" and data["git_commit"]
    rows = {row["variant"]: row for row in data["rows"]}
    assert list(rows) == ["reference-eager-fp32", "fast-eager-fp32", "reference-compile-fp32"]
    for name in ("reference-eager-fp32", "fast-eager-fp32"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["images_per_s"] > 0 and len(row["images_per_s_epochs"]) == data["sizes"]["epochs"]
        assert 0 <= row["data_wait_share"] <= 1 and row["peak_memory_mb"] > 0
        assert len(row["train_loss_epochs"]) == 2 and "--backend" in row["command"]
    # the same data, seed and maths: the fast loss kernels train to the reference's loss
    assert rows["fast-eager-fp32"]["train_loss_epochs"] == pytest.approx(
        rows["reference-eager-fp32"]["train_loss_epochs"], rel=1e-4)
    assert rows["reference-compile-fp32"]["status"] == "skipped"
    assert rows["reference-compile-fp32"]["reason"].startswith("budget")
    assert data["ddp"]["passed"] and "cpu x1 (DDP, gloo)" in data["ddp"]["backend_line"]
    profile = data["profile"]
    assert profile["status"] == "ok", profile
    assert list(profile["phases"]) == ["to_device", "forward", "loss", "backward", "optimizer"]
    assert profile["ops"] and all(not op["name"].startswith("step.") for op in profile["ops"])
    assert data["data"]["train_images"] == data["sizes"]["steps"] * data["sizes"]["batch_size"]
    for name in (report.name, report.with_suffix(".profile.txt").name, "gpu-train-logs.tar.gz"):
        assert (out / name).is_file(), name
    with tarfile.open(out / "gpu-train-logs.tar.gz") as logs:  # one file: the device returns at most 8
        assert "./ddp.out" in logs.getnames()
    assert "aten::" in (out / report.with_suffix(".profile.txt").name).read_text()
    table = done.stdout[done.stdout.index("wrote "):]
    assert "fast-eager-fp32" in table and "DDP: passed" in table and "backward" in table
    markdown = make_table.render_training([str(report)])
    assert "| reference eager fp32 |" in markdown and "*35*" in markdown and "skipped (budget" in markdown
    assert make_table.render([str(report)]) == ""  # not an op-level report


def test_gpu_train_refuses_without_cuda_unless_smoke() -> None:
    if gpu_train.torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    done = subprocess.run([python(), "benchmarks/gpu_train.py"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--cpu-smoke" in done.stderr


def test_variants_in_priority_order() -> None:
    names = [variant.name for variant in gpu_train.VARIANTS]
    assert names == ["reference-eager-bf16", "fast-eager-bf16", "reference-eager-fp32", "fast-eager-fp32",
                     "reference-compile-bf16", "fast-compile-bf16", "reference-compile-fp32", "fast-compile-fp32",
                     "reference-eager-bf16-tied", "fast-eager-bf16-tied"]
    tied = gpu_train.VARIANTS[-1].flags()
    assert tied[:4] == ["--backend", "auto", "--amp", "bf16"] and "--attention-norm" in tied
    assert "--compile" in gpu_train.VARIANTS[4].flags()


@pytest.mark.parametrize("name, short", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                         ("Tesla V100-SXM2-16GB", "v100"), ("NVIDIA A100-SXM4-80GB", "a100")])
def test_gpu_short_name(name: str, short: str) -> None:
    assert gpu_train.gpu_short_name(name) == short


@pytest.mark.parametrize("train", [4, 128, 256, 250])
def test_folder_size_gives_exactly_the_training_images(train: int) -> None:
    n = train_runs.folder_size_for(train)
    samples = [Sample(f"s{i:04d}", Path(f"{i}.png"), None) for i in range(n)]
    assert len(seeded_split(samples, 0, Path("."))["train"]) == train


def test_estimate_uses_the_closest_finished_run() -> None:
    prior = gpu_train.PRIOR_S
    eager, compiled = gpu_train.VARIANTS[0], gpu_train.VARIANTS[4]
    fp32_compiled = gpu_train.VARIANTS[6]
    assert gpu_train.estimate_s(compiled, [], prior) == prior["compile"]
    rows = [{"compile": False, "amp": "bf16", "tied": False, "wall_s": 30.0},
            {"compile": True, "amp": "bf16", "tied": False, "wall_s": 100.0},
            {"compile": True, "amp": "bf16", "tied": False, "wall_s": None}]  # skipped
    assert gpu_train.estimate_s(eager, rows, prior) == 30.0
    assert gpu_train.estimate_s(compiled, rows, prior) == 100.0
    assert gpu_train.estimate_s(fp32_compiled, rows, prior) == 100.0  # same compile flag, other precision


def test_epoch_summary_reads_old_and_new_logs(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["epoch", "train_loss", "seconds", "images_per_s", "peak_memory_mb", "data_wait_share"])
        writer.writerows([[1, 0.9, 5, 10, 900, 0.5], [2, 0.8, 1, 50, 800, 0.1], [3, 0.7, 1, 60, 810, 0.2]])
    summary = gpu_train.epoch_summary(path)
    assert summary["images_per_s"] == 55 and summary["peak_memory_mb"] == 810
    assert summary["data_wait_share"] == pytest.approx(0.15) and summary["train_loss_epochs"] == [0.9, 0.8, 0.7]
    path.write_text("epoch,train_loss,seconds,images_per_s,peak_memory_mb\n1,0.9,5,10,900\n")  # before the column
    summary = gpu_train.epoch_summary(path)
    assert summary["images_per_s"] == 10 and summary["data_wait_share"] is None


def test_training_table_goes_between_its_markers(tmp_path: Path) -> None:
    readme = "x\n" + make_table.BEGIN + "\nold\n" + make_table.END + "\n" + make_table.TRAIN_BEGIN + "\nold\n" \
        + make_table.TRAIN_END + "\ny\n"
    replaced = make_table.replace_block(readme, "NEW", make_table.TRAIN_BEGIN, make_table.TRAIN_END)
    assert "NEW" in replaced and replaced.count("old") == 1 and replaced.endswith("y\n")
