"""Atomic file writes, shared by the decode cache, checkpoints, logs and pictures."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the ``.<name>.<random>.tmp`` files an interrupted :func:`atomic_write` left directly in
    ``folder`` (the real files are intact: the rename never happened); returns what was removed."""
    removed = []
    for leftover in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if leftover.is_file():
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def atomic_write(path: Path, write: Callable[[IO[bytes]], None], *, durable: bool = True) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``.

    Readers see the old file or the new one, never a torn one, even if the process is
    killed mid-write (the rename is atomic on POSIX and Windows). ``durable`` also
    fsyncs before the rename, for files that must survive a power cut (checkpoints),
    not for ones that are cheap to rebuild (cache entries).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        # mkstemp makes the file 0600; outputs are for sharing, so give them what open() would (umask)
        if hasattr(os, "fchmod"):  # POSIX; Windows has no such modes
            os.fchmod(handle, 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as file:
            write(file)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    atomic_write(path, lambda file: file.write(text.encode()))
