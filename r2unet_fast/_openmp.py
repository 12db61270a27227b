"""OpenMP's wait policy for the command-line programs, set before torch loads OpenMP.

PyTorch's CPU kernels run on GNU OpenMP, whose idle threads spin for a while
before sleeping. Alone on a machine that costs nothing, but two PyTorch
processes on the same cores spin against each other: measured on 2 cores,
the default run's epoch went from 20 s alone to 97-124 s with a second run
beside it, and to 26-31 s with the passive policy in both (docs/training.md,
"Sharing the machine"). Alone, passive measured the same as the default.

libgomp reads ``OMP_WAIT_POLICY`` once, when torch first loads it, so this
runs from the package's ``__init__`` before anything imports torch, and only
when the process is one of our commands (``python -m r2unet_fast.train`` and
the others): importing the library never changes the caller's OpenMP. A
policy the user set is kept.
"""
from __future__ import annotations

import os
import sys

COMMANDS: frozenset[str] = frozenset({"r2unet_fast.train", "r2unet_fast.evaluate", "r2unet_fast.predict",
                                      "r2unet_fast.ablate"})


def launched_command(argv: list[str]) -> str | None:
    """The module of ``python [options] -m <module> ...`` in ``argv`` when it is one of ours, else None."""
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "-m":
            return argv[i + 1] if i + 1 < len(argv) and argv[i + 1] in COMMANDS else None
        if arg == "-c" or not arg.startswith("-"):
            return None  # a script or -c: its own arguments follow
    return None


def prefer_passive_wait() -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for our commands unless the user chose a policy or torch is
    already loaded (then libgomp has read its environment and the setting would only mislead)."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return
    if launched_command(list(getattr(sys, "orig_argv", []))) is not None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
