"""Output arrays of the fused CPU kernel, and reuse of a large one between calls.

A fresh array costs the operating system a zeroed page for every page it touches, and on a VM
that hands freed memory back to its host, a host fault per page. At 100,000 queries x 16 keys
(H=8, d=64; out 205 MB) that was a third of the call: 101.8 ms with a fresh out against 72.5 ms
with a reused one, interleaved with other work (docs/performance-notes.md). A repeated call of
one shape -- a decode loop, a benchmark, the next layer -- gets that time back here: when an out
of at least :data:`MIN_BYTES` is garbage collected (every view of it gone), its memory is kept
and the next out of exactly that size is placed in it.

What is kept: at most one block (the last one freed), of at most :data:`MAX_BYTES`. A call that
needs another size frees the kept block before it allocates, so no call's peak memory grows;
between calls the process holds at most that one block more than it would without reuse.
``HPCATTN_REUSE_OUT=0`` turns reuse off; :func:`release` frees the kept block now. The kernel
writes every element of out, so nothing of an earlier result can show through (tested with a
kept block full of NaN).
"""
from __future__ import annotations

import os
import threading

import numpy as np

ENV = "HPCATTN_REUSE_OUT"
#: smaller arrays are left to the allocator: glibc serves them from its heap, whose freed memory
#: it reuses itself (its mmap threshold grows up to 32 MiB)
MIN_BYTES = 32 << 20
MAX_BYTES = 1 << 30
ALIGN = 64  # bytes: a cache line, so the kernel's streaming stores of out rows write whole lines

# reentrant: an allocation inside the lock can run the cyclic GC, which can collect a lease
_lock = threading.RLock()
_kept: list = []  # at most one raw block (uint8), ready for reuse


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip() != "0"


def release() -> int:
    """Free the kept block now; returns the bytes freed (0 when none was kept)."""
    with _lock:
        blocks = _kept[:]
        _kept.clear()
    return sum(b.nbytes for b in blocks)


def kept_bytes() -> int:
    with _lock:
        return sum(b.nbytes for b in _kept)


class _Lease:
    """The base of an out placed in a reusable block: it lives while any view of out does, and
    when it is collected the block goes back to the pool."""

    __slots__ = ("raw", "__array_interface__")

    def __init__(self, raw, offset: int, shape: tuple):
        self.raw = raw
        self.__array_interface__ = {"data": (raw.ctypes.data + offset, False), "shape": shape,
                                    "typestr": np.dtype(np.float32).str, "version": 3}

    def __del__(self):
        try:
            _give_back(self.raw)
        except Exception:  # interpreter shutdown: module globals may be gone; the memory is freed
            pass


def _give_back(raw) -> None:
    if not enabled():
        return
    with _lock:
        if not _kept:
            _kept.append(raw)


def _take(nbytes: int):
    """A kept block of exactly ``nbytes`` or None; a kept block of another size is freed here."""
    with _lock:
        blocks = _kept[:]
        _kept.clear()
    hit = next((b for b in blocks if b.nbytes == nbytes), None)
    del blocks  # the other size, if any, is freed before the caller allocates
    return hit


def empty_f32(shape) -> np.ndarray:
    """An uninitialised float32 array of ``shape`` whose data starts on a 64-byte boundary; from
    a kept block when one of the size is free and reuse is on."""
    shape = tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape)) * 4
    need = nbytes + ALIGN
    if nbytes < MIN_BYTES or nbytes > MAX_BYTES or not enabled():
        raw = np.empty(need, np.uint8)
        skip = -raw.ctypes.data % ALIGN
        return raw[skip: skip + nbytes].view(np.float32).reshape(shape)
    raw = _take(need)
    if raw is None:
        raw = np.empty(need, np.uint8)
    return np.asarray(_Lease(raw, -raw.ctypes.data % ALIGN, shape))
