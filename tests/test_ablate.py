"""``python -m r2unet_fast.ablate``: a tiny grid end to end, resume, presets, flag errors, and the bootstrap."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_support import TINY, assert_usage_error, read_csv, read_json, run

from r2unet_fast.ablate import bootstrap_interval, main, paired_differences
from r2unet_fast.ablate import cli as ablate_cli
from r2unet_fast.metrics import METRICS
from r2unet_fast.train.runtime import peak_memory_mb, reset_peak_memory
from r2unet_fast.train.trainer import Trainer, TrainingDiverged

# No predictions.png: its drawing is most of a tiny cell's time, and the ablation never reads it.
BASE = [*TINY, "--device", "cpu", "--preview", "0"]
TWO_CELLS = [*BASE, "--blocks", "conv", "--attention", "off,on", "--losses", "hybrid"]
CELLS = ("conv-noatt-hybrid-s0", "conv-att-hybrid-s0")


@pytest.fixture(scope="module")
def two_cells(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ablate") / "grid"
    assert main([*TWO_CELLS, "--out", str(out)]) == 0
    return out


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


def _per_image(folder: Path) -> dict[str, float]:
    return {row["id"]: float(row["jaccard"]) for row in read_csv(folder / "per_image_test.csv")}


def _table_rows(markdown: str, section: str) -> list[list[str]]:
    """The body rows of the first table after the heading ``section``, as lists of cell texts."""
    after = markdown.split(section, 1)[1].splitlines()
    start = next(index for index, line in enumerate(after) if line.startswith("|"))
    table = []
    for line in after[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return table[2:]  # past the header and the alignment row


def test_two_cell_ablation_writes_cells_csv_markdown_and_png(two_cells: Path) -> None:
    rows = read_csv(two_cells / "results.csv")
    assert [row["cell"] for row in rows] == list(CELLS)
    assert [(row["block"], row["attention"], row["loss"], row["seed"]) for row in rows] == \
        [("conv", "off", "hybrid", "0"), ("conv", "on", "hybrid", "0")]
    configs = [read_json(two_cells / name / "config.json") for name in CELLS]
    assert [c["attention"] for c in configs] == [False, True] and {c["block"] for c in configs} == {"conv"}
    shared = [{k: v for k, v in c.items() if k not in ("attention", "out")} for c in configs]
    assert shared[0] == shared[1]  # identical data, schedule and seed
    for row, name in zip(rows, CELLS):
        metrics = read_json(two_cells / name / "metrics.json")
        per_image = read_csv(two_cells / name / "per_image_test.csv")
        assert len(per_image) == 6 == int(row["eval_test_images"])  # TINY's 6 test images
        for metric in METRICS:
            assert float(row[f"val_{metric}"]) == pytest.approx(metrics["val"][metric])
            assert float(row[f"test_{metric}"]) == pytest.approx(metrics["test"][metric])
            # Synthetic images are scored at their generated size, so evaluate's per-image mean is the trainer's.
            mean = np.mean([float(r[metric]) for r in per_image])
            assert float(row[f"eval_test_{metric}"]) == pytest.approx(mean, abs=1e-12)
            assert mean == pytest.approx(metrics["test"][metric], abs=1e-9)
        assert int(row["parameters"]) > 0 and float(row["train_seconds"]) > 0 and float(row["images_per_s"]) > 0
    assert int(rows[1]["parameters"]) > int(rows[0]["parameters"])  # the gates add weights
    with Image.open(two_cells / "ablation.png") as image:
        assert image.format == "PNG" and image.width > 300


def test_markdown_bolds_the_best_and_gives_the_paired_difference(two_cells: Path) -> None:
    markdown = (two_cells / "results.md").read_text()
    rows = {row["cell"]: row for row in read_csv(two_cells / "results.csv")}
    table = _table_rows(markdown, "## Test set")
    assert [r[1] for r in table] == ["`conv-noatt-hybrid`", "`conv-att-hybrid`"]
    assert [r[0] for r in table] == ["U-Net", "AttU-Net"]
    jaccards = [float(rows[name]["eval_test_jaccard"]) for name in CELLS]
    js = [r[7] for r in table]  # model, cell, seeds, AC, SE, SP, DC, JS
    assert [value.strip("*") for value in js] == [f"{j:.4f}" for j in jaccards]
    best = max(round(j, 4) for j in jaccards)  # a tie on the printed digits bolds both
    assert [value.startswith("**") for value in js] == [round(j, 4) == best for j in jaccards]
    # The claim's mean difference, recomputed from the two per-image CSVs (paired by case ID).
    att, plain = _per_image(two_cells / CELLS[1]), _per_image(two_cells / CELLS[0])
    assert set(att) == set(plain) and len(att) == 6
    delta = np.mean([att[case] - plain[case] for case in att])
    claim = _table_rows(markdown, "### Attention gates: on − off")
    assert claim[0][:4] == ["`conv-att-hybrid` − `conv-noatt-hybrid`", "conv, hybrid loss", "6 (1)", f"{delta:+.4f}"]
    low, high = (float(v) for v in re.findall(r"[-+]\d\.\d{4}", claim[0][4]))
    assert low <= delta <= high
    assert "Not in this grid: its losses are hybrid (add --losses hybrid,bce)." in markdown


def test_rerun_skips_done_cells_and_scores_trained_ones_without_training(
        two_cells: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "grid"
    shutil.copytree(two_cells, out)
    (out / CELLS[1] / "per_image_test.csv").unlink()  # trained, killed before its scores were written
    before = {name: _mtimes(out / name) for name in CELLS}
    code, stdout, err = run(main, [*TWO_CELLS, "--out", str(out)], capsys)
    assert code == 0, err
    assert f"{CELLS[0]}: already done, skipped" in stdout and "done in " not in stdout  # nothing trained
    assert _mtimes(out / CELLS[0]) == before[CELLS[0]]
    # Only scored: the checkpoints, logs and metrics stay as they were, the scores are back.
    after = _mtimes(out / CELLS[1])
    assert {k: v for k, v in after.items() if k in before[CELLS[1]] and "eval_test" not in k} == \
        {k: v for k, v in before[CELLS[1]].items() if "eval_test" not in k}
    assert _per_image(out / CELLS[1]) == _per_image(two_cells / CELLS[1])
    assert read_csv(out / "results.csv") == read_csv(two_cells / "results.csv")


def test_grown_grid_trains_only_its_new_cells(two_cells: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "grid"
    shutil.copytree(two_cells, out)
    before = _mtimes(out / CELLS[0])
    argv = [*BASE, "--blocks", "conv,residual", "--attention", "off", "--losses", "hybrid", "--out", str(out)]
    code, stdout, err = run(main, argv, capsys)
    assert code == 0, err
    assert f"{CELLS[0]}: already done, skipped" in stdout and _mtimes(out / CELLS[0]) == before
    assert stdout.count("done in ") == 1  # the trainer's last line: only residual-noatt-hybrid-s0 trained
    assert (out / "residual-noatt-hybrid-s0" / "checkpoints" / "best.pt").is_file()
    rows = read_csv(out / "results.csv")
    assert [row["cell"] for row in rows] == [CELLS[0], "residual-noatt-hybrid-s0"]
    assert "Not in this grid: it has attention off only (add --attention off,on)." in (out / "results.md").read_text()


def test_interrupted_cell_resumes_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "grid"
    argv = [*BASE, "--epochs", "2", "--blocks", "conv", "--attention", "off", "--losses", "bce", "--out", str(out)]
    original = Trainer.train_step

    def killed_in_epoch_two(self: Trainer, batch: dict, epoch: int, step: int) -> float:
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, batch, epoch, step)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", killed_in_epoch_two)
        code, stdout, _ = run(main, argv, capsys)
    assert code == 130 and "rerun the same command to resume it" in stdout
    cell = out / "conv-noatt-bce-s0"
    assert not (cell / "metrics.json").exists() and read_csv(out / "results.csv") == []
    code, stdout, err = run(main, argv, capsys)
    assert code == 0, err
    assert "resuming after epoch 1 of 2" in stdout
    assert [row["epoch"] for row in read_csv(cell / "log.csv")] == ["1", "2"]
    assert [row["cell"] for row in read_csv(out / "results.csv")] == ["conv-noatt-bce-s0"]


def test_a_diverged_cell_does_not_stop_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "grid"
    original = Trainer.train_step

    def unstable_with_gates(self: Trainer, batch: dict, epoch: int, step: int) -> float:
        if self.config.attention:
            raise TrainingDiverged("training diverged: loss is nan at epoch 1, step 1")
        return original(self, batch, epoch, step)

    monkeypatch.setattr(Trainer, "train_step", unstable_with_gates)
    argv = [*BASE, "--blocks", "conv", "--attention", "on,off", "--losses", "dice", "--out", str(out)]
    code, stdout, err = run(main, argv, capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: 1 of 2 cells diverged (conv-att-dice-s0")
    assert "conv-att-dice-s0 diverged, going on with the others" in stdout
    assert [row["cell"] for row in read_csv(out / "results.csv")] == ["conv-noatt-dice-s0"]
    table = _table_rows((out / "results.md").read_text(), "## Test set")
    assert [(r[1], r[2]) for r in table] == [("`conv-att-dice`", "not finished"), ("`conv-noatt-dice`", "1")]


def test_rerun_with_other_settings_is_refused(two_cells: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "grid"
    shutil.copytree(two_cells, out)
    code, _, err = run(main, [*TWO_CELLS, "--lr", "0.01", "--out", str(out)], capsys)
    assert_usage_error(code, err, "conv-noatt-hybrid-s0 was trained with lr = 0.003", "0.01")


@pytest.mark.parametrize("flags, needles", [
    (["--blocks", "foo"], ["--blocks", "'foo' is not one of conv, residual, recurrent, r2"]),
    (["--attention", "maybe"], ["--attention", "'maybe' is not one of off, on"]),
    (["--losses", "hybrid,hybrid"], ["--losses", "names a value twice"]),
    (["--seeds", "0"], ["--seeds", "expected a number of seeds >= 1"]),
    (["--no-attention"], ["unrecognized arguments: --no-attention"]),
    (["--lr", "nan"], ["--lr must be a finite number"]),
])
def test_bad_flags_give_one_error_line(flags: list[str], needles: list[str], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(main, [*BASE, *flags, "--out", str(tmp_path / "grid")], capsys)
    assert_usage_error(code, err, *needles)
    assert not (tmp_path / "grid").exists()


def test_out_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(main, BASE, capsys)
    assert_usage_error(code, err, "--out")


def test_presets_resolve_their_grid_and_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("R2UNET_FAST_PH2", raising=False)
    fallback = tmp_path / "ph2"
    monkeypatch.setattr(ablate_cli, "checkout_relative", lambda path: fallback)
    code, _, err = run(main, ["--preset", "cpu-small", "--out", str(tmp_path / "a"), "--print-config"], capsys)
    assert_usage_error(code, err, "the cpu-small preset also looked in", str(fallback))
    fallback.mkdir()
    code, stdout, err = run(main, ["--preset", "cpu-small", "--out", str(tmp_path / "a"), "--print-config"], capsys)
    assert code == 0, err
    printed = json.loads(stdout)
    config = printed["config"]
    assert (config["dataset"], config["data"], config["image_size"], config["epochs"]) == \
        ("ph2", str(fallback), 96, 25)
    assert printed["cells"] == [f"{b}-{a}-hybrid-s0" for b in ("conv", "residual", "recurrent", "r2")
                                for a in ("noatt", "att")]
    code, stdout, err = run(main, ["--preset", "isic2017-gpu", "--data", str(tmp_path), "--seed", "3", "--seeds", "2",
                                   "--blocks", "r2", "--epochs", "5", "--out", str(tmp_path / "b"), "--print-config"],
                            capsys)
    assert code == 0, err
    printed = json.loads(stdout)
    assert (printed["config"]["dataset"], printed["config"]["image_size"], printed["config"]["epochs"]) == \
        ("isic2017", 256, 5)
    assert printed["cells"] == [f"r2-{a}-{loss}-s{seed}" for seed in (3, 4) for a in ("noatt", "att")
                                for loss in ("hybrid", "bce", "dice")]


# ---- the bootstrap --------------------------------------------------------------------------------

def test_bootstrap_of_constant_differences_is_a_zero_width_interval_at_that_value() -> None:
    interval = bootstrap_interval([[0.25] * 40])
    assert interval.mean == interval.low == interval.high == 0.25
    stratified = bootstrap_interval([[1.0, 1.0], [3.0, 3.0, 3.0]])  # mean of the seeds' means
    assert stratified.mean == stratified.low == stratified.high == 2.0


def test_bootstrap_of_a_symmetric_sample_contains_zero() -> None:
    interval = bootstrap_interval([[-0.1, 0.1] * 25])
    assert interval.mean == pytest.approx(0.0, abs=1e-15) and interval.low < 0.0 < interval.high
    assert interval.low == pytest.approx(-interval.high, abs=0.01)


def test_bootstrap_known_answers() -> None:
    # Two values {0, 1}: resampled means are 0, 0.5, 1 with chances 1/4, 1/2, 1/4, so the 2.5% and 97.5%
    # quantiles are exactly 0 and 1.
    interval = bootstrap_interval([[0.0, 1.0]])
    assert (interval.mean, interval.low, interval.high) == (0.5, 0.0, 1.0)
    # A large normal sample: the interval is close to mean +- 1.96 standard errors.
    values = np.random.default_rng(1).normal(0.3, 0.1, 400)
    interval = bootstrap_interval([values])
    half = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    assert interval.high - interval.low == pytest.approx(2 * half, rel=0.1)
    assert interval.mean == pytest.approx(values.mean())
    # Fixed generator seed: the same data gives the same interval; shifting the data shifts it.
    again, shifted = bootstrap_interval([values]), bootstrap_interval([values + 1.0])
    assert again == interval
    assert (shifted.low, shifted.high) == pytest.approx((interval.low + 1.0, interval.high + 1.0), abs=1e-12)


def test_bootstrap_refuses_empty_input() -> None:
    with pytest.raises(ValueError, match="no empty stratum"):
        bootstrap_interval([[1.0], []])


def test_paired_differences_pair_by_case_id_within_each_seed() -> None:
    first = {0: {"b": 0.5, "a": 0.9, "x": 0.1}, 1: {"a": 0.2}, 2: {"z": 1.0}}
    second = {0: {"a": 0.8, "b": 0.25}, 1: {"a": 0.5}, 3: {"z": 0.0}}
    differences = paired_differences(first, second)
    assert differences == [[pytest.approx(0.1), 0.25], [pytest.approx(-0.3)]]


# ---- per-cell peak memory -------------------------------------------------------------------------

def test_cpu_peak_memory_window_restarts_so_cells_do_not_inherit_earlier_peaks() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        pytest.skip("the peak RSS cannot be reset here (not Linux, or /proc/self/clear_refs is not writable)")
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    block = np.ones(160 * 2**20 // 8)  # 160 MiB, touched, then freed: an earlier cell's peak
    del block
    earlier = peak_memory_mb(cpu)
    reset_peak_memory(cpu)
    assert peak_memory_mb(cpu) < earlier - 100
