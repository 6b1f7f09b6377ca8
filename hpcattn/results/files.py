"""File-system steps of the results writer: never follow a link hpcattn did not make, never reuse
a temporary name, delete only names hpcattn writes, and turn a full disk into one line.

* Temporaries get a name unique to the writer (``.hpcattn-<name>.<pid>.<random>.tmp``), created
  with ``O_CREAT|O_EXCL|O_NOFOLLOW``, or live in a private directory made by ``mkdtemp`` (mode
  0700) where nobody else can plant anything; they are fsync'ed and renamed over the target
  (a rename replaces a link at the target, it never writes through it).
* The lock file is opened with ``O_NOFOLLOW`` and never truncated.
* Cleaning a folder removes only the names hpcattn itself writes there (:data:`KNOWN`, see
  :mod:`.cleaning`); a file anyone else put there stays. HDF5 writes shards through :mod:`.sink`.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
import tempfile

from .format import ResultsError

TMP_PREFIX = ".hpcattn-"
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
CHUNK = 1 << 20
# names hpcattn writes inside <master>.d: activation shards, case records, temporaries, the lock
SHARD = re.compile(r"(r\d+|all)\.h5")
CASE_DIR = re.compile(r"case_\d{4,}")
RECORD = re.compile(r"(case_\d{4,})-([0-9a-f]{32})\.h5")
TEMP = re.compile(re.escape(TMP_PREFIX) + r"[\w.+-]*\.tmp")
LOCK_NAME = ".lock"
DIGEST_NAME = ".master.sum"
KNOWN = (SHARD, RECORD, TEMP)


# --- errors -------------------------------------------------------------------------------------

DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def write_error(exc: OSError, path: str) -> ResultsError:
    """One line for a failed write; a full disk says how much is left and how to go on."""
    if exc.errno in DISK_FULL:
        return ResultsError(f"disk full: could not write {path} ({os.strerror(exc.errno)}; "
                            f"{free_bytes(path):,} bytes free there); free some space and rerun "
                            "the same command to resume")
    return ResultsError(f"could not write {path}: {exc.strerror or exc}")


def free_bytes(path: str) -> int:
    """Bytes a non-root user may still write on the file system of ``path`` (0 when unknown)."""
    d = path
    while d and not os.path.isdir(d):
        d = os.path.dirname(d)
    try:
        st = os.statvfs(d or ".")
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def check_space(path: str, need: int) -> None:
    """Refuse up front when ``need`` bytes do not fit (a clear message before any work; the
    writers still handle a disk that fills up while they write)."""
    free = free_bytes(path)
    if free and free < need:
        raise ResultsError(f"disk full: {path} needs about {need:,} bytes but only {free:,} are "
                           "free there; free some space and rerun the same command to resume")


# --- paths --------------------------------------------------------------------------------------

def resolve_output(path) -> str:
    """The file an output path names, absolute. A symlink is written through (its target is the
    file; the link stays a link), a link to nothing is refused, a directory is refused."""
    path = os.path.abspath(os.fspath(path))
    if os.path.islink(path):
        real = os.path.realpath(path)
        if not os.path.isfile(real):
            raise ResultsError(f"{path} is a symlink to {real}, which is not a file; expected a "
                               "plain path or a link to an hpcattn results file")
        return real
    if os.path.isdir(path):
        raise ResultsError(f"{path} is a directory; expected a results file path (e.g. results/x.h5)")
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def own_dir(path: str) -> str:
    """``path`` as a directory hpcattn may write in: made when absent; a symlink (or anything that
    is not a directory) is refused, so nothing is ever written or deleted through a link."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise ResultsError(f"{path} is a symlink; hpcattn writes only into folders it made (remove "
                           "the link or choose another --output)")
    if not stat.S_ISDIR(st.st_mode):
        raise ResultsError(f"{path} is not a directory; hpcattn keeps activations and its lock "
                           "there (move it away or choose another --output)")
    return path


def is_link(path: str) -> bool:
    return os.path.islink(path)


# --- writing ------------------------------------------------------------------------------------

def fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | _CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def new_temp(final: str) -> tuple[str, int]:
    """A temporary next to ``final`` under a name of this writer's own, created (never opened
    through a link, never one that exists): (name, descriptor open for reading and writing)."""
    folder, base = os.path.split(final)
    tmp = os.path.join(folder, f"{TMP_PREFIX}{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        return tmp, os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644)
    except OSError as exc:
        raise write_error(exc, final) from None


@contextlib.contextmanager
def publishing(final: str):
    """``fd`` of a temporary of this writer's own that becomes ``final`` when the block ends
    (fsync'ed, renamed, folder fsync'ed); on any failure the temporary is gone, ``final`` is as
    it was, and an OSError (a full disk...) becomes one :func:`write_error`."""
    folder = os.path.dirname(final)
    tmp, fd = new_temp(final)
    try:
        try:
            yield fd
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException as exc:
        remove(tmp)
        if isinstance(exc, OSError):
            raise write_error(exc, final) from None
        raise
    fsync_dir(folder)


def write_bytes(final: str, data) -> None:
    """Make ``data`` durable and atomically visible as ``final`` (see :func:`publishing`)."""
    with publishing(final) as fd:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:CHUNK]):]


def private_dir_path(parent: str) -> str:
    """A fresh directory only this user can write in (mkdtemp, mode 0700)."""
    try:
        return tempfile.mkdtemp(prefix=TMP_PREFIX, suffix=".tmp", dir=parent)
    except OSError as exc:
        raise write_error(exc, parent) from None


@contextlib.contextmanager
def private_dir(parent: str):
    """A :func:`private_dir_path`, removed with what is in it afterwards."""
    path = private_dir_path(parent)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)   # ours alone: nothing planted can be in it


def publish_file(tmp: str, final: str) -> None:
    """Make ``tmp`` (a file this process wrote in a :func:`private_dir`) durable as ``final``."""
    try:
        fd = os.open(tmp, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except OSError as exc:
        raise write_error(exc, final) from None
    fsync_dir(os.path.dirname(final))


# --- reading, checksums ---------------------------------------------------------------------------

def read_bytes(path: str, limit: int | None = None) -> bytes:
    """The bytes of regular file ``path`` (a symlink is refused: OSError ELOOP)."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        chunks = []
        while True:
            chunk = os.read(fd, CHUNK)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            if limit is not None and sum(map(len, chunks)) > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
    finally:
        os.close(fd)


def read_head(path: str, n: int) -> bytes:
    """The first ``n`` bytes of regular file ``path`` (empty when it is a link or unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except OSError:
        return b""
    try:
        return os.read(fd, n) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError:
        return b""
    finally:
        os.close(fd)


def checksum_bytes(data) -> dict:
    return {"size": len(data), "blake2b": hashlib.blake2b(data, digest_size=16).hexdigest()}


def checksum(path: str) -> dict | None:
    """Size and BLAKE2b-128 of regular file ``path``; None when it is absent, a link or unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        h, size = hashlib.blake2b(digest_size=16), 0
        while True:
            chunk = os.read(fd, CHUNK)
            if not chunk:
                return {"size": size, "blake2b": h.hexdigest()}
            h.update(chunk)
            size += len(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)


def mismatch(path: str, want: dict) -> str | None:
    """Why file ``path`` is not the one checksum ``want`` describes (None when it is)."""
    got = checksum(path)
    if got is None:
        return "is missing" if not os.path.lexists(path) else "is not a readable regular file"
    if got["size"] != want.get("size"):
        return f"has {got['size']} bytes, recorded {want.get('size')}"
    if got["blake2b"] != want.get("blake2b"):
        return "does not match its recorded checksum (changed or corrupted)"
    return None


def remove(path: str) -> None:
    """Unlink ``path`` (a file or a link: unlinking never touches a link's target); absent is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def known(name: str) -> bool:
    return any(p.fullmatch(name) for p in KNOWN)
