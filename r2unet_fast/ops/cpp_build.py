"""How the C++ kernels (``csrc/``) are compiled, defined once for both builds.

``setup.py`` compiles them into ``r2unet_fast._C`` at install time when torch is
importable there (``pip install --no-build-isolation .``);
:mod:`r2unet_fast.ops.extension` compiles the same sources on first use when it
is not (a plain ``pip install .``). Both read their flags from here so the two
builds produce the same code. Standard library only: ``setup.py`` runs this file
by path, before the package or torch can be imported.
"""
from __future__ import annotations

from pathlib import Path

# Source and header suffixes under csrc/; the headers are shipped too, since the
# first-use build compiles from the installed copy.
SOURCE_SUFFIX = ".cpp"
HEADER_SUFFIX = ".h"

# Flags of our own: -O3 for the vector loops; OpenMP for the per-image work split.
# Tuples: torch's builders append to the lists they are given, so each caller passes a copy.
EXTRA_COMPILE_ARGS: tuple[str, ...] = ("-O3", "-fopenmp")
EXTRA_LINK_ARGS: tuple[str, ...] = ("-fopenmp",)

# setuptools also compiles with CPython's own CFLAGS (typically
# "-Wsign-compare -DNDEBUG -g -fwrapv -O3 -Wall"); torch's cpp_extension.load does
# not. Of those, two change the generated code and so are repeated for the first-use
# build: NDEBUG drops the debug-only asserts of the c10/ATen headers from the hot
# loops, and -fwrapv fixes signed overflow semantics. -g (debug info, 15 MB of it)
# and the warnings do not change the code and are left out.
PYTHON_CODEGEN_ARGS: tuple[str, ...] = ("-DNDEBUG", "-fwrapv")


def sources(folder: Path) -> list[Path]:
    """The translation units under ``folder``, sorted so the build order is stable."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix == SOURCE_SUFFIX)


def shipped_files(folder: Path) -> list[Path]:
    """Sources and headers under ``folder``: what an installed package needs to rebuild."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix in (SOURCE_SUFFIX, HEADER_SUFFIX))
