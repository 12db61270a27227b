"""Our commands make OpenMP's idle threads sleep instead of spin (r2unet_fast/_openmp.py);
importing the library leaves the caller's OpenMP alone, and a user's own policy is kept."""
from __future__ import annotations

import subprocess

import pytest
from train_support import python, subprocess_env

from r2unet_fast._openmp import launched_command

# libgomp prints its settings at start-up with OMP_DISPLAY_ENV=VERBOSE; the passive policy is a
# spin count of 0, the default 300000 (it prints the policy as PASSIVE in both cases).
PASSIVE = "GOMP_SPINCOUNT = '0'"


def _spin_counts(*args: str, **env: str) -> list[str]:
    full = subprocess_env()
    full.pop("OMP_WAIT_POLICY", None)
    full.update(OMP_DISPLAY_ENV="VERBOSE", **env)
    done = subprocess.run([python(), *args], env=full, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    counts = [line.strip() for line in done.stderr.splitlines() if "GOMP_SPINCOUNT" in line]
    assert counts, f"libgomp printed no settings:\n{done.stderr}"
    return counts


def test_the_training_command_waits_passively() -> None:
    # evaluate and predict take the same path (launched_command, tested below)
    assert set(_spin_counts("-m", "r2unet_fast.train", "--help")) == {PASSIVE}


def test_importing_the_library_keeps_openmp_defaults() -> None:
    counts = _spin_counts("-c", "import r2unet_fast, torch; torch.ones(4).sum()")
    assert PASSIVE not in counts, counts


def test_a_policy_the_user_chose_is_kept() -> None:
    counts = _spin_counts("-m", "r2unet_fast.evaluate", "--help", OMP_WAIT_POLICY="ACTIVE")
    assert PASSIVE not in counts, counts


@pytest.mark.parametrize(("argv", "expected"), [
    (["python", "-m", "r2unet_fast.train", "--epochs", "2"], "r2unet_fast.train"),
    (["python", "-u", "-m", "r2unet_fast.predict"], "r2unet_fast.predict"),
    (["python", "-m", "r2unet_fast.evaluate", "--checkpoint", "run"], "r2unet_fast.evaluate"),
    (["python", "-m", "pytest", "-m", "r2unet_fast.train"], None),
    (["python", "script.py", "-m", "r2unet_fast.train"], None),
    (["python", "-c", "import x", "-m", "r2unet_fast.train"], None),
    (["python"], None),
    (["python", "-m"], None),
])
def test_only_our_commands_count(argv: list[str], expected: str | None) -> None:
    assert launched_command(argv) == expected
