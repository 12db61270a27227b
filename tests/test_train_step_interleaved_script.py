"""benchmarks/train_step_interleaved.py: the interleaved reference-vs-fast step timing, run as users
run it (a subprocess) at a tiny shape, and its summary statistics on known numbers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_support import REPO, python, subprocess_env

sys.path.insert(0, str(REPO))
from benchmarks.train_step_interleaved import summary  # noqa: E402


def test_summary_gives_min_median_and_interquartile_range() -> None:
    assert summary([5.0, 1.0, 3.0, 2.0, 4.0]) == {"min_ms": 1.0, "median_ms": 3.0, "iqr_ms": 3.0}
    assert summary([7.0]) == {"min_ms": 7.0, "median_ms": 7.0, "iqr_ms": 0.0}


def test_script_times_both_sides_every_round(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    done = subprocess.run([python(), "benchmarks/train_step_interleaved.py", "--rounds", "3", "--warmup", "1",
                           "--shape", "4,2,1,16", "--out", str(out)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["kind"] == "interleaved_step" and report["rounds"] == 3 and report["mode"] == "one_process"
    assert report["shape"] == {"name": "custom", "base": 4, "depth": 2, "batch": 1, "size": 16, "tied": False}
    for side in ("reference", "fast"):
        times = report["sides"][side]["times_ms"]
        assert len(times) == 3 and all(t > 0 for t in times)
        assert report["sides"][side]["min_ms"] == min(times)
    assert report["speedup_median"] == pytest.approx(report["sides"]["reference"]["median_ms"]
                                                     / report["sides"]["fast"]["median_ms"])
    assert "fast vs reference" in done.stdout


def test_bad_shape_is_refused_with_the_expected_form() -> None:
    done = subprocess.run([python(), "benchmarks/train_step_interleaved.py", "--shape", "16,4"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "base,depth,batch,size" in done.stderr


def test_processes_mode_runs_each_side_in_its_own_process(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    done = subprocess.run([python(), "benchmarks/train_step_interleaved.py", "--processes", "--rounds", "2",
                           "--warmup", "0", "--shape", "4,2,1,16", "--out", str(out)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "processes" and report["rounds"] == 2
    for side in ("reference", "fast"):
        times = report["sides"][side]["times_ms"]
        assert len(times) == 2 and all(t > 0 for t in times)
        assert report["sides"][side]["minflt_per_step"] >= 0
    assert "minor faults/step" in done.stdout
