"""Reshaped copies in use: who may delete an older copy, and when.

Why: with ``AutoReshape(keep_old=False)`` a job removes the older reshaped copies of the
checkpoint it resumed, but a second job resuming the same checkpoint at another layout at the
same time may be writing or loading one of them (seen as a ``FileNotFoundError`` inside
DeepSpeed's ``load_checkpoint``). So every rank that loads a copy holds a shared lock on the
copy's ``.in_use.lock`` (``fcntl.flock(LOCK_SH)``) from before the copy is written or checked
until its engine has loaded it; the deleter takes the exclusive lock without waiting
(``LOCK_EX | LOCK_NB``) and keeps, with a log line, every copy it cannot lock, and every copy
whose output lock (``execute.lock_output``: a writer is preparing, repairing or finalizing it)
is held. The kernel drops both locks when a holder dies, so neither goes stale.

The in-use lock file lives inside the copy and is removed with it, while the deleter holds it
exclusively. A loader that had opened it before and waited gets its lock on a removed file:
it sees ``st_nlink == 0`` and opens the path again (the same check filelock makes), so it
never holds a lock that nobody else can see.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from lightning_reshape.checkpoint.execute import output_errors

__all__ = ["IN_USE_LOCK", "RemovedCopies", "disk_usage", "hold_in_use", "remove_other_copies"]

log = logging.getLogger(__name__)

IN_USE_LOCK = ".in_use.lock"
# flock missing on this file system (some network file systems without a lock daemon)
_NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL}


def _open_lock(folder: Path, *, create_folder: bool) -> int | None:
    """An fd of ``folder/.in_use.lock`` (created if missing); None if the folder is gone."""
    path = folder / IN_USE_LOCK
    if create_folder:
        folder.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, 0o644)
    except FileNotFoundError:
        return None


@contextmanager
def hold_in_use(folder: str | os.PathLike[str]) -> Iterator[bool]:
    """Mark the reshaped copy at ``folder`` in use while the block runs (a shared lock, so any
    number of ranks and jobs may hold it at once; creates ``folder`` if needed).

    Waits only while a deleter removes the copy (then the copy is written anew). Yields False
    when the file system has no ``flock``: then no deleter can lock it either, and so none
    deletes it (:func:`remove_other_copies` keeps copies it cannot lock)."""
    folder = Path(folder)
    while True:
        with output_errors(folder):  # read-only, full, ...: one line naming the path
            fd = _open_lock(folder, create_folder=True)
        if fd is None:  # removed between mkdir and open: make it again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_FLOCK:
                raise
            log.warning("%s: no flock on this file system; the copy is not marked in use", folder)
            yield False
            return
        if os.fstat(fd).st_nlink == 0:  # removed while we waited for the deleter
            os.close(fd)
            continue
        break
    try:
        yield True
    finally:
        os.close(fd)  # drops the lock


@dataclass
class RemovedCopies:
    """What :func:`remove_other_copies` did: removed folders, bytes freed, folders kept."""

    removed: list[str] = field(default_factory=list)
    freed: int = 0
    kept: list[tuple[str, str]] = field(default_factory=list)  # (folder, why)


def disk_usage(path: Path) -> int:
    """Bytes the files under ``path`` occupy on disk (allocated blocks, as ``du`` counts)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def _remove_unless_busy(copy: Path) -> int | str | None:
    """Remove ``copy`` if nobody uses or writes it: the bytes freed, or why it was kept, or
    None when it was gone already (another job removed it)."""
    fd = _open_lock(copy, create_folder=False)
    if fd is None:
        return None
    held: list[FileLock] = []
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "another job is loading it"
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                raise
            return "no flock on this file system, so whether a job uses it is unknown"
        if os.fstat(fd).st_nlink == 0:
            return None
        for lock_file in sorted(copy.glob(".*.lock")):  # execute.lock_output's, one per tag
            if lock_file.name == IN_USE_LOCK or lock_file.is_symlink():
                continue
            lock = FileLock(lock_file)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                return "another job is writing or checking it"
            held.append(lock)
        size = disk_usage(copy)
        shutil.rmtree(copy, ignore_errors=True)
        return size
    finally:
        for lock in held:
            lock.release()
        os.close(fd)


def remove_other_copies(keep: str | os.PathLike[str], prefix: str) -> RemovedCopies:
    """Remove the finished copies (folders named ``prefix*`` holding a ``latest`` file) beside
    ``keep``, except ``keep`` itself and any copy in use or being written (listed as kept).

    Only folders we name and complete are candidates, so the original checkpoint and anything
    else in the folder are never touched."""
    keep = Path(keep)
    done = RemovedCopies()
    for path in sorted(keep.parent.iterdir()):
        if not path.name.startswith(prefix) or path == keep or path.is_symlink():
            continue
        if not (path.is_dir() and (path / "latest").is_file()):
            continue
        try:
            outcome = _remove_unless_busy(path)
        except OSError as exc:  # a lock file that is a link or a folder, ...: keep that copy
            outcome = f"cannot lock it ({exc.strerror or exc}); remove it by hand if unused"
        if isinstance(outcome, str):
            done.kept.append((str(path), outcome))
        elif outcome is not None:
            done.removed.append(str(path))
            done.freed += outcome
    return done
