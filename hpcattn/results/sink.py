"""The file object HDF5 writes activation shards through, so that a full disk never reaches
HDF5 (HDF5 2.0 crashes with SIGSEGV, or prints 'Exception ignored', closing a file whose write
failed); the failure is raised afterwards as one line, and the temporary is removed."""
from __future__ import annotations

import contextlib
import io
import os

from .files import publishing
from .format import LIBVER, import_h5py


class _QuietSink(io.RawIOBase):
    """The file HDF5 writes a shard through. A failed write (a full disk) is kept for the caller
    and the rest of the file goes to memory, so HDF5 never sees an I/O error: HDF5 2.0 crashes
    (SIGSEGV) or prints 'Exception ignored' closing a file whose write failed."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd, self.pos, self.error, self.spill = fd, 0, None, None

    def readable(self):
        return True

    def writable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        if self.spill is not None:
            return self.spill.seek(offset, whence)
        self.pos = os.lseek(self.fd, offset, whence)
        return self.pos

    def tell(self):
        return self.spill.tell() if self.spill is not None else self.pos

    def readinto(self, buf):
        if self.spill is not None:
            return self.spill.readinto(buf)
        data = os.pread(self.fd, len(buf), self.pos)
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def write(self, buf):
        if self.spill is None:
            try:
                n = os.pwrite(self.fd, buf, self.pos)
                self.pos += n
                return n
            except OSError as exc:
                self.error = exc
                self.spill = io.BytesIO(os.pread(self.fd, os.fstat(self.fd).st_size, 0))
                self.spill.seek(self.pos)
        return self.spill.write(buf)

    def truncate(self, size=None):
        if self.spill is not None:
            return self.spill.truncate(size)
        os.ftruncate(self.fd, self.pos if size is None else size)
        return size

    def flush(self):
        pass


@contextlib.contextmanager
def h5_writer(final: str):
    """An h5py file that becomes ``final`` when the block ends (fsync'ed, renamed). On a full
    disk, or any failure, the temporary is removed, ``final`` stays as it was, and one
    ResultsError says so."""
    with publishing(final) as fd:
        sink = _QuietSink(fd)
        with import_h5py().File(sink, "w", libver=LIBVER) as f:
            yield f
        if sink.error is not None:
            raise sink.error
