"""The recurrent conv step's Triton kernels compile for a Hopper GPU (benchmarks/triton_aot_check.py):
the interpreter that runs their tests here never runs Triton's GPU compiler."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ptxas_reason() -> str | None:
    try:
        from triton.backends.nvidia import compiler
        try:
            compiler.get_ptxas(90)
        except TypeError:  # triton versions before the arch argument
            compiler.get_ptxas()
    except Exception as e:  # no NVIDIA backend or no ptxas in this triton build
        return f"triton cannot compile for NVIDIA GPUs here: {type(e).__name__}: {e}"
    return None


@pytest.mark.skipif(_ptxas_reason() is not None, reason=str(_ptxas_reason()))
def test_the_step_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile, not a cache hit
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "triton_aot_check.py"), "--quick", "--arch", "90"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    compiled = [line for line in done.stdout.splitlines() if ": ok," in line]
    assert len(compiled) == 4 and "every variant compiled" in done.stdout, done.stdout
