"""The C++ CPU kernels: the module built at install time, or the same sources built on first use.

``pip install --no-build-isolation .`` compiles ``csrc/`` into ``r2unet_fast._C``
against the torch already installed. A plain ``pip install .`` builds the wheel in
an isolated environment that has no torch, so nothing can be compiled then; the
wheel carries the sources instead (``r2unet_fast/_csrc/``), and
:func:`load_extension` compiles them the first time the cpu backend is needed, with
``torch.utils.cpp_extension.load`` (ninja) and the flags of :mod:`.cpp_build`, into::

    $R2UNET_FAST_CACHE/ext/<torch version>-<key>/     (default ~/.cache/r2unet_fast/ext/...)

``<key>`` hashes the sources, the flags, the Python ABI, the platform and the
compiler, so a new torch, Python or source tree builds anew and anything else
reuses the earlier build. The build takes a few minutes on 2 cores and prints one
line on stderr while it runs. Processes that start together (DDP ranks, parallel
test runs) build once: the others wait on a lock and then load the result.

Every user of the kernels (:mod:`.cpu`, dispatch's backend report, the tests) goes
through :func:`load_extension` or :func:`unavailable_reason`, so which build is used,
and why neither is when that happens, is decided here once per process.

Environment:
    ``R2UNET_FAST_NO_EXT=1``: no C++ kernels (setup.py skips them too); the cpu
    backend reports that reason and "auto" runs the reference.
    ``R2UNET_FAST_JIT=1``: ignore a prebuilt ``r2unet_fast._C`` and use the first-use
    build (tests use it to exercise this path in a checkout that has the prebuilt one).
    ``R2UNET_FAST_CACHE``: the cache root, shared with the decode cache.
    ``CXX`` and ``MAX_JOBS``: torch's own variables for the compiler and the parallel jobs.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import platform
import re
import shutil
import sys
import sysconfig
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Iterator

from ..files import atomic_write_text
from . import cpp_build

PREBUILT_MODULE = "r2unet_fast._C"
# The first-use build's module name (its PyInit_ symbol): distinct from the prebuilt
# "_C" so that neither can be mistaken for the other, nor for torch._C.
JIT_NAME = "r2unet_fast_C"
NO_EXT_ENV = "R2UNET_FAST_NO_EXT"
JIT_ENV = "R2UNET_FAST_JIT"
# Same variable and default as r2unet_fast.data.cache.default_cache_dir; not imported
# from there because importing the data package pulls in its image libraries.
CACHE_ENV = "R2UNET_FAST_CACHE"

_DONE = "complete"        # written last: its presence means the folder holds a loadable module
_FAILED = "failed.txt"    # a compile error, kept so later processes do not spend minutes failing again
_LOCK = "build.lock"      # our flock; torch's own baton file in the same folder is "lock"


class ExtensionUnavailable(ImportError):
    """The C++ kernels cannot be loaded; the message says why and what fixes it."""


def cache_root() -> Path:
    """``$R2UNET_FAST_CACHE`` if set, else ``~/.cache/r2unet_fast``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "r2unet_fast"


def source_dir() -> Path | None:
    """The C++ sources: the copy installed in the package (``r2unet_fast/_csrc``), else the
    source checkout's ``csrc/`` (a ``PYTHONPATH`` or editable install), else None."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "_csrc"
    if (installed / "bindings.cpp").is_file():
        return installed
    checkout = package.parent
    if (checkout / "setup.py").is_file() and (checkout / "csrc" / "bindings.cpp").is_file():
        return checkout / "csrc"
    return None


def build_folder(sources: Path) -> Path:
    """Where the first-use build of ``sources`` goes for this torch, Python and platform."""
    import torch
    from torch.utils.cpp_extension import get_cxx_compiler

    digest = hashlib.sha256()
    for path in cpp_build.shipped_files(sources):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    # Everything else the module's binary depends on. The torch version names the folder
    # (so old builds are easy to spot and delete) and is hashed with its CUDA/HIP build.
    inputs = (cpp_build.EXTRA_COMPILE_ARGS, cpp_build.EXTRA_LINK_ARGS, cpp_build.PYTHON_CODEGEN_ARGS,
              sysconfig.get_config_var("EXT_SUFFIX"), sys.implementation.cache_tag, platform.machine(),
              torch.__version__, torch.version.cuda, torch.version.hip, get_cxx_compiler())
    digest.update(repr(inputs).encode())
    return cache_root() / "ext" / f"{torch.__version__}-{digest.hexdigest()[:16]}"


def _ninja_dir() -> str | None:
    """The folder holding a ninja executable: from PATH, else the ``ninja`` pip package's
    (installed with r2unet_fast, but only on PATH when its environment is activated)."""
    found = shutil.which("ninja")
    if found is not None:
        return os.path.dirname(found)
    try:
        import ninja
    except ImportError:
        return None
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and shutil.which("ninja", path=bin_dir) is not None:
        return bin_dir
    return None


def _missing_tools() -> str | None:
    """What the first-use build lacks (compiler, ninja, Python headers), or None."""
    from torch.utils.cpp_extension import get_cxx_compiler

    missing = []
    compiler = get_cxx_compiler()
    if shutil.which(compiler) is None:
        missing.append(f"a C++ compiler (`{compiler}` not found: install g++, or set CXX to one)")
    if _ninja_dir() is None:
        missing.append("ninja (`pip install ninja`)")
    # The folder torch.utils.cpp_extension puts on the include path for Python.h.
    include = sysconfig.get_path("include", scheme="nt" if os.name == "nt" else "posix_prefix")
    if not (Path(include) / "Python.h").is_file():
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        missing.append(f"Python's C headers ({include}/Python.h is missing: install python{version}-dev)")
    if not missing:
        return None
    return "compiling the C++ kernels on first use needs " + " and ".join(missing)


@contextlib.contextmanager
def _ninja_on_path(folder: str) -> Iterator[None]:
    """``folder`` on PATH while torch runs ninja (it calls plain ``ninja``)."""
    old = os.environ.get("PATH", "")
    if folder in old.split(os.pathsep):
        yield
        return
    os.environ["PATH"] = folder + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold the build folder's lock; a process that must wait says so on stderr.

    torch's own file baton also serialises builds, but a builder killed outright leaves
    its baton file behind and every later process waits on it forever. An flock is
    released by the kernel when its holder dies, and while we hold it no other process
    of ours is inside ``cpp_extension.load``, so a leftover baton can be removed.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's baton alone serialises the builds
        yield
        return
    with open(folder / _LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"r2unet_fast: waiting for another process that is compiling the C++ kernels in {folder}",
                  file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (folder / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _import_built(folder: Path) -> ModuleType:
    """The module a finished first-use build left in ``folder``."""
    so_path = folder / (folder / _DONE).read_text().strip()
    try:
        spec = importlib.util.spec_from_file_location(so_path.name.split(".")[0], so_path)
        if spec is None or spec.loader is None:
            raise ImportError(f"{so_path} is not an extension module")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as e:
        raise ExtensionUnavailable(f"the C++ kernels built in {folder} do not load ({e}); "
                                   f"delete that folder to rebuild them") from e
    return module


# gcc's "file:line:col: error: ..." and "fatal error: ...", not torch's "RuntimeError: Error building".
_COMPILER_ERROR = re.compile(r"\berror:", re.IGNORECASE)


def _error_summary(text: str, limit: int = 300) -> str:
    """The first compiler error line of a build log (else its last line), shortened."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if _COMPILER_ERROR.search(line)]
    line = (errors or lines or ["no output"])[0]
    return line if len(line) <= limit else line[:limit] + "..."


def _failed(folder: Path) -> ExtensionUnavailable:
    log = folder / _FAILED
    return ExtensionUnavailable(
        f"compiling the C++ kernels failed ({_error_summary(log.read_text())}); the full log is {log}: "
        f"fix the cause, then delete {folder} to try again")


def _build(sources: Path) -> ModuleType:
    """The first-use build of ``sources``: reused when it exists, compiled when it does not."""
    try:
        from torch.utils import cpp_extension
    except ImportError as e:
        raise ExtensionUnavailable(f"torch.utils.cpp_extension does not import ({e})") from e
    folder = build_folder(sources)
    if (folder / _DONE).is_file():  # the common case: built by an earlier process
        return _import_built(folder)
    if (folder / _FAILED).is_file():
        raise _failed(folder)
    missing = _missing_tools()
    if missing is not None:
        raise ExtensionUnavailable(missing)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExtensionUnavailable(f"cannot create the build folder {folder} ({e}): "
                                   f"set {CACHE_ENV} to a writable folder") from e
    with _exclusive(folder):
        if (folder / _DONE).is_file():  # another process built it while this one waited
            return _import_built(folder)
        if (folder / _FAILED).is_file():
            raise _failed(folder)
        # A module a killed build left half-linked would look up to date to ninja.
        (folder / f"{JIT_NAME}{getattr(cpp_extension, 'LIB_EXT', '.so')}").unlink(missing_ok=True)
        print(f"r2unet_fast: compiling the C++ kernels on first use into {folder} "
              "(once per torch version; a few minutes)...", file=sys.stderr, flush=True)
        try:
            with _ninja_on_path(_ninja_dir() or ""):
                module = cpp_extension.load(
                    JIT_NAME, [str(p) for p in cpp_build.sources(sources)],
                    extra_cflags=[*cpp_build.EXTRA_COMPILE_ARGS, *cpp_build.PYTHON_CODEGEN_ARGS],
                    extra_ldflags=list(cpp_build.EXTRA_LINK_ARGS), build_directory=str(folder), verbose=False)
        except Exception as e:  # compile or link errors; an interrupt is not a failure to remember
            atomic_write_text(folder / _FAILED, f"{type(e).__name__}: {e}\n")
            raise _failed(folder) from e
        # load() may have renamed the module (name_v1) if this process built before: record its file.
        atomic_write_text(folder / _DONE, Path(module.__file__).name + "\n")
        return module


def find() -> tuple[ModuleType | None, str | None]:
    """Locate (or build) the kernels now: ``(module, None)``, or ``(None, reason)``. Uncached;
    use :func:`load_extension` or :func:`unavailable_reason`."""
    if os.environ.get(NO_EXT_ENV) == "1":
        return None, f"{NO_EXT_ENV}=1 is set, which turns the C++ kernels off; unset it to use them"
    prebuilt_problem = None
    if os.environ.get(JIT_ENV) != "1":
        try:
            return importlib.import_module(PREBUILT_MODULE), None
        except ModuleNotFoundError as e:
            if e.name != PREBUILT_MODULE:
                prebuilt_problem = f"{PREBUILT_MODULE} does not load ({e})"
        except ImportError as e:  # typically built against another torch: the first-use build replaces it
            prebuilt_problem = f"{PREBUILT_MODULE} does not load ({e})"
    sources = source_dir()
    try:
        if sources is None:
            raise ExtensionUnavailable(
                "the C++ kernels are not built and their sources are not installed "
                "(no r2unet_fast/_csrc): reinstall with `pip install .` from a source checkout")
        return _build(sources), None
    except ExtensionUnavailable as e:
        reason = str(e)
        return None, reason if prebuilt_problem is None else f"{prebuilt_problem}, and {reason}"


_find_lock = threading.Lock()
_found_once: tuple[ModuleType | None, str | None] | None = None


def _found() -> tuple[ModuleType | None, str | None]:
    """:func:`find`, once per process; a second thread waits for the first instead of building too."""
    global _found_once
    with _find_lock:
        if _found_once is None:
            _found_once = find()
        return _found_once


def load_extension() -> ModuleType:
    """The C++ kernels' module (prebuilt, else built on first use); raises
    :class:`ExtensionUnavailable` with the reason when there is none."""
    module, reason = _found()
    if module is None:
        raise ExtensionUnavailable(reason)
    return module


def unavailable_reason() -> str | None:
    """Why the C++ kernels cannot run, or None when :func:`load_extension` succeeds.
    The first call may compile them (see the module docstring)."""
    return _found()[1]
