"""benchmarks/gpu_report.py runs only on a GPU for real; its --cpu-smoke mode runs every section's
checks and timing code through the Triton interpreter, so the script cannot rot between GPU runs."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from train_support import REPO, python, subprocess_env


def test_cpu_smoke_runs_every_section(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = subprocess.run([python(), "benchmarks/gpu_report.py", "--cpu-smoke", "--out", str(out)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = {s["name"]: s for s in report["sections"]}
    assert set(sections) == {"hybrid_loss", "attention_gate", "recurrent_conv", "train_step"}
    for section in sections.values():
        assert section["checks_passed"]
        for row in section["timings"]:
            assert row["ms"]["fast"] is not None and row["ms"]["eager"] is not None, row
    assert "attention_gate" in done.stdout and "checks passed" in done.stdout
