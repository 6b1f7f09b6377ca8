"""The writers' lock of one master: ``<master>.d/.lock`` with flock, keyed on the resolved file.

The lock file is opened with ``O_NOFOLLOW`` (a planted symlink is refused, never followed) and
never truncated. A writer that made the ``.d`` folder and wrote nothing else in it removes it
again when it lets go, so a refused run or merge leaves nothing behind; whoever acquires checks
that the file it locked is still the one at that path (it may have just been removed).
"""
from __future__ import annotations

import contextlib
import errno
import os

from . import files
from .format import ResultsError

_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def acquire(folder: str, what: str) -> tuple[int, bool]:
    """Lock ``folder/.lock`` (making ``folder`` when absent): (descriptor, whether this call made
    ``folder``). ResultsError when another writer holds it, or when the lock is a symlink."""
    import fcntl

    made = not os.path.lexists(folder)
    files.own_dir(folder)
    path = os.path.join(folder, files.LOCK_NAME)
    for _ in range(100):
        try:
            fd = os.open(path, _FLAGS, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ResultsError(f"{path} is a symlink; hpcattn opens only a lock file it made "
                                   "(remove the link)") from None
            raise files.write_error(exc, path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ResultsError(f"another hpcattn run is writing {what} (lock held); wait for it "
                               "or choose another --output") from None
        except OSError:
            return fd, made  # no flock here (some network file systems): go on unlocked
        try:
            if os.fstat(fd).st_ino == os.lstat(path).st_ino:
                return fd, made
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder before us removed the file: lock the new one
    raise ResultsError(f"could not lock {path}: it keeps changing")


def release(fd: int, folder: str, made: bool) -> None:
    """Let go of the lock; remove ``folder`` again if this writer made it and it holds nothing
    but the lock (removed while still held, so nobody can be holding that file)."""
    try:
        if made and os.listdir(folder) == [files.LOCK_NAME]:
            files.remove(os.path.join(folder, files.LOCK_NAME))
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    except OSError:
        pass
    finally:
        os.close(fd)
