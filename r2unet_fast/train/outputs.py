"""Where the commands write: output paths checked before any work, and one training per run folder.

Each check raises :class:`UsageError` (one ``error:`` line, exit 2) naming the path and the fix
before a model is built or an image is read, so a wrong ``--out`` costs seconds, not a whole
training or evaluation that then fails to save.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Sequence

from ..files import TMP_SUFFIX
from .checkpoint import CHECKPOINT_DIR
from .config import UsageError
from .distributed import DistContext

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked (see RunLock)
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
_LISTED = 5  # paths named in one error line; the rest are counted


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest existing ancestor: the folder that creating ``path`` writes into."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def probe_folder(folder: Path, flag: str, shown: Path | None = None) -> None:
    """UsageError unless a file can be created and removed in ``folder`` or, when it does not exist yet, in
    its nearest existing ancestor (where it will be created). ``shown`` is the path the error names
    (default ``folder``).

    A real write, not ``os.access``: root passes every permission check, yet cannot create files under
    /proc or on a read-only mount. The probe is a dot-file ending in ``.tmp``, so if the process dies
    between creating and removing it, :func:`r2unet_fast.files.remove_stale_temporaries` clears it.
    """
    shown = folder if shown is None else shown
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise UsageError(f"{flag} {shown}: {base} is a file, not a folder; pick another {flag}")
    try:
        handle, name = tempfile.mkstemp(dir=base, prefix=".write-probe.", suffix=TMP_SUFFIX)
    except OSError as error:
        raise UsageError(f"{flag} {shown}: cannot write in {base} ({error.strerror or error}); "
                         f"pick a {flag} folder you can write to") from None
    os.close(handle)
    os.unlink(name)


def check_output_folder(folder: Path, flag: str = "--out", subfolders: Sequence[str] = ()) -> None:
    """``folder`` (and those of ``subfolders`` that already exist in it) is, or can become, a folder
    this process can write files into; UsageError otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder} is a file, not a folder; pick another {flag} (it is not touched)")
    probe_folder(folder, flag)
    for name in subfolders:
        if (folder / name).is_dir():  # a run folder made writable again may still hold a read-only part
            probe_folder(folder / name, flag, shown=folder)


def check_output_file(path: Path, flag: str = "--out") -> None:
    """``path`` names a file (not a folder) in a folder this process can write to; UsageError otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; {flag} takes a file name, e.g. {path / 'summary.json'}")
    probe_folder(path.parent, flag, shown=path)


def _listed(paths: Sequence[Path]) -> str:
    names = ", ".join(str(path) for path in paths[:_LISTED])
    return names + (f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else "")


def check_overwrites(outputs: Sequence[Path], inputs: Sequence[Path], *, overwrite: bool,
                     flag: str = "--out") -> None:
    """Refuse (UsageError) before any work when one of ``outputs`` is one of ``inputs`` (never
    allowed: the command would destroy what it reads), is a folder, or already exists and
    ``overwrite`` is false (a file this run did not write: ground truth, another model's masks)."""
    def key(path: Path) -> str:  # the same file under two spellings, or through a symlink
        return os.path.realpath(path)

    read = {key(path) for path in inputs}
    clobbered = [path for path in outputs if key(path) in read]
    if clobbered:
        raise UsageError(f"{flag} would overwrite input {_listed(clobbered)}; pick another {flag}, outside the "
                         "input folders, or rename the inputs")
    folders = [path for path in outputs if path.is_dir()]
    if folders:
        raise UsageError(f"{flag}: {_listed(folders)} {'is a folder' if len(folders) == 1 else 'are folders'} "
                         f"where an output file goes; move it or pick another {flag}")
    existing = [path for path in outputs if os.path.lexists(path)]
    if existing and not overwrite:
        several = len(existing) > 1
        raise UsageError(f"{flag}: {len(existing)} output file{'s' if several else ''} already "
                         f"exist{'' if several else 's'}: {_listed(existing)}; pass --overwrite to replace "
                         f"{'them' if several else 'it'}, or pick another {flag}")


class RunLock:
    """An exclusive ``flock`` on ``<run>/.lock``, held while one training writes the run folder.

    The kernel drops the lock when the holder's last file descriptor closes, which includes the
    process dying by ``kill -9`` or a crash, so a lock file left behind never blocks a later run;
    only a live holder does. The file holds the holder's PID so the refusal can name it; it is not
    deleted on release (unlinking a lock file races with a process that just opened it). Local
    file systems and NFS (where Linux emulates flock with byte-range locks) are covered; on
    platforms without ``fcntl`` (Windows) runs are not locked.
    """

    def __init__(self, folder: Path, file: IO[str] | None) -> None:
        self.folder, self._file = folder, file

    @classmethod
    def acquire(cls, folder: Path) -> "RunLock":
        """Create ``folder`` if needed and lock it; UsageError naming the folder and the holder's PID
        when another process holds it."""
        folder = Path(folder)
        if fcntl is None:
            return cls(folder, None)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            file = open(folder / LOCK_NAME, "a+")  # "a+": create without truncating another holder's PID
        except OSError as error:
            raise UsageError(f"--out {folder}: cannot create its lock file ({error.strerror or error}); "
                             "pick a folder you can write to") from None
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held by another open file (another process, or this one)
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise UsageError(f"run folder {folder} is in use by another training (PID {holder}); wait for it "
                             "to finish or stop it, or pick another --out") from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        return cls(folder, file)

    @property
    def held(self) -> bool:
        """True until :meth:`release` (always False where runs are not locked)."""
        return self._file is not None

    def release(self) -> None:
        """Unlock (safe to call twice). Unlocked explicitly rather than by closing: forked DataLoader
        workers share the open file, and a flock lasts until its last descriptor closes."""
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def claim_run_folder(out: Path, dist: DistContext, *, new: bool) -> RunLock | None:
    """Check that the run folder ``out`` can be written, lock it for this training and, for a ``new``
    run, refuse a folder that already holds one; returns the lock (None on ranks other than 0).

    Rank 0 alone checks and locks (it alone writes the folder), then every rank gets its verdict,
    so under torchrun all processes stop together with the same error instead of waiting forever
    for rank 0. The lock comes before the "already holds a run" check so that a run still
    training is reported as busy (with its PID), not as one to ``--resume``.
    """
    lock, problem = None, None
    if dist.is_main:
        try:
            check_output_folder(out, "--out", subfolders=(CHECKPOINT_DIR,))
            lock = RunLock.acquire(out)
            if new and (out / CHECKPOINT_DIR / "last.pt").exists():
                raise UsageError(f"--out {out} already holds a run; continue it with --resume {out} or pick "
                                 "another --out")
        except UsageError as error:
            if lock is not None:
                lock.release()
            problem = str(error)
    problem = dist.broadcast(problem)
    if problem is not None:
        raise UsageError(problem)
    return lock
