"""Which global sequence positions each rank holds: small pure functions and their inverses.

Three layouts of a length-``n`` sequence over ``size`` ranks, all with uneven lengths allowed:

* ``contiguous``: rank r holds one block ``[start_r, start_r + count_r)`` (remainders go to the
  first ranks, like mpi4py-fft's ``_blockdist``).
* ``zigzag``: the sequence is cut into ``2*size`` blocks; rank r holds blocks ``r`` and
  ``2*size-1-r``, so every rank gets one early and one late block and causal work balances.
* ``striped``: rank r holds positions ``r, r+size, r+2*size, ...``.

Within a rank, positions are always increasing. Every function here is pure and cheap;
``Distribution`` is the value that carries them through the ring (computed once per call), and
the distributed ``shard``/``unshard`` at the bottom only move data.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

LAYOUTS = ("contiguous", "zigzag", "striped")


def blockdist(n: int, size: int, rank: int) -> tuple[int, int]:
    """(count, start) of block ``rank`` when ``n`` items are split into ``size`` near-equal blocks."""
    q, r = divmod(n, size)
    count = q + (1 if rank < r else 0)
    start = rank * q + min(rank, r)
    return count, start


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is unknown; expected one of {', '.join(LAYOUTS)}")
    return layout


def local_slices(n: int, size: int, rank: int, layout: str) -> list[slice]:
    """Slices of the global sequence that ``rank`` holds, in local order."""
    check_layout(layout)
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside 0..{size - 1}")
    if layout == "contiguous":
        count, start = blockdist(n, size, rank)
        return [slice(start, start + count)]
    if layout == "zigzag":
        c0, s0 = blockdist(n, 2 * size, rank)
        c1, s1 = blockdist(n, 2 * size, 2 * size - 1 - rank)
        return [slice(s0, s0 + c0), slice(s1, s1 + c1)]
    return [slice(rank, n, size)]  # striped


def local_count(n: int, size: int, rank: int, layout: str) -> int:
    return sum(len(range(*s.indices(n))) for s in local_slices(n, size, rank, layout))


def positions(n: int, size: int, rank: int, layout: str) -> np.ndarray:
    """Global positions held by ``rank`` (int64, increasing)."""
    parts = [np.arange(*s.indices(n), dtype=np.int64) for s in local_slices(n, size, rank, layout)]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def global_order(n: int, size: int, layout: str) -> np.ndarray:
    """Concatenation of every rank's positions, rank 0 first: ``x_global[order] == cat(shards)``."""
    return np.concatenate([positions(n, size, r, layout) for r in range(size)])


def owner(n: int, size: int, layout: str, pos) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``positions``: (rank, local index) of each global position in ``pos``."""
    check_layout(layout)
    pos = np.asarray(pos, dtype=np.int64)
    if pos.size and (pos.min() < 0 or pos.max() >= n):
        raise ValueError(f"positions must lie in 0..{n - 1}")
    if layout == "striped":
        return pos % size, pos // size
    nblocks = size if layout == "contiguous" else 2 * size
    q, r = divmod(n, nblocks)
    # block index of each position: the first r blocks have q+1 items
    big = r * (q + 1)
    block = np.where(pos < big, pos // (q + 1), r + (pos - big) // max(q, 1))
    start = block * q + np.minimum(block, r)
    offset = pos - start
    if layout == "contiguous":
        return block, offset
    first = block < size
    rank = np.where(first, block, 2 * size - 1 - block)
    c_first = q + (rank < r)  # length of the rank's early block
    local = np.where(first, offset, c_first + offset)
    return rank, local


# --- the distribution as a value ------------------------------------------------------------

@dataclass(frozen=True)
class Distribution:
    """A length-``n`` sequence spread over ``size`` ranks by ``layout``: the layout checked and
    every rank's slices and counts computed once (as mpi4py-fft's ``Pencil`` carries its
    subshape and start). Immutable; equal (and hashed) by ``(n, size, layout)``. Positions are
    made from the slices when asked (O(N/P) each), so the value itself stays O(P) in size.

    >>> d = Distribution(10, 3, "zigzag")
    >>> d.counts, d.positions(1).tolist()
    ((3, 3, 4), [2, 3, 8])
    """

    n: int
    size: int
    layout: str = "contiguous"
    counts: tuple = field(init=False, repr=False, compare=False)
    _slices: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        check_layout(self.layout)
        if self.size < 1 or self.n < 0:
            raise ValueError(f"n={self.n} positions on size={self.size} ranks; expected n >= 0 and size >= 1")
        slices = tuple(tuple(local_slices(self.n, self.size, r, self.layout)) for r in range(self.size))
        object.__setattr__(self, "_slices", slices)
        object.__setattr__(self, "counts", tuple(sum(len(range(*s.indices(self.n))) for s in sl)
                                                 for sl in slices))

    def count(self, rank: int) -> int:
        return self.counts[rank]

    def slices(self, rank: int) -> list[slice]:
        """Slices of the global sequence ``rank`` holds, in local order."""
        return list(self._slices[rank])

    def positions(self, rank: int) -> np.ndarray:
        """Global positions rank ``rank`` holds (int64, increasing, read-only)."""
        parts = [np.arange(*s.indices(self.n), dtype=np.int64) for s in self._slices[rank]]
        pos = np.concatenate(parts) if len(parts) > 1 else parts[0]
        pos.setflags(write=False)
        return pos

    def owner(self, pos) -> tuple[np.ndarray, np.ndarray]:
        """(rank, local index) of each global position in ``pos``."""
        return owner(self.n, self.size, self.layout, pos)

    @property
    def global_order(self) -> np.ndarray:
        """Every rank's positions, rank 0 first: ``x_global[order] == cat(shards)``."""
        return np.concatenate([self.positions(r) for r in range(self.size)])

    def mismatch(self, counts) -> str | None:
        """Why ranks holding ``counts`` positions are not this distribution (None if they are)."""
        if list(counts) == list(self.counts):
            return None
        return (f"ranks hold {list(counts)} positions but layout {self.layout!r} with N={self.n} on "
                f"P={self.size} ranks assigns {list(self.counts)}")


# --- moving data -------------------------------------------------------------------------------

def _comm(comm):
    if comm is None:
        from mpi4py import MPI

        return MPI.COMM_WORLD
    return comm


def shard(x, comm=None, layout: str = "contiguous", axis: int = 1):
    """This rank's part of the global array ``x`` (same on every rank) along ``axis``."""
    comm = _comm(comm)
    n = x.shape[axis]
    if n < comm.size:
        raise ValueError(f"sequence length N={n} is smaller than the number of ranks P={comm.size}")
    idx = [slice(None)] * x.ndim
    parts = []
    for s in local_slices(n, comm.size, comm.rank, layout):
        idx[axis] = s
        parts.append(x[tuple(idx)])
    xp = _array_module(x)
    return xp.ascontiguousarray(xp.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0])


def unshard(x_local, comm=None, layout: str = "contiguous", axis: int = 1):
    """Gather every rank's shard into the global array (on every rank): the inverse of ``shard``."""
    from mpi4py import MPI

    comm = _comm(comm)
    check_layout(layout)
    xp = _array_module(x_local)
    host = np.ascontiguousarray(np.moveaxis(_to_host(x_local), axis, 0))
    meta = comm.allgather((host.shape, host.dtype.str))
    rest = {(m[0][1:], m[1]) for m in meta}
    if len(rest) != 1:
        raise ValueError(
            f"unshard: ranks disagree on the other dimensions or dtype: {sorted(rest)}; expected one")
    counts = [m[0][0] for m in meta]
    dist = Distribution(sum(counts), comm.size, layout)
    if (problem := dist.mismatch(counts)) is not None:
        raise ValueError(f"unshard: {problem}")
    n = dist.n
    row = host.dtype.itemsize * int(np.prod(host.shape[1:], dtype=np.int64))
    gathered = np.empty((n,) + host.shape[1:], dtype=host.dtype)
    comm.Allgatherv([host, host.size * host.dtype.itemsize, MPI.BYTE],
                    [gathered, [c * row for c in counts], MPI.BYTE])
    out = np.empty_like(gathered)
    out[dist.global_order] = gathered
    out = np.moveaxis(out, 0, axis)
    return xp.asarray(out)


def _array_module(x):
    """The module of ``x``'s array library when it has NumPy's interface (NumPy, CuPy), else
    NumPy: shard/unshard hand back the kind of array they were given. (They sit below the
    backend, so they ask the array, not ``hpcattn.backend``.)"""
    mod = sys.modules.get(type(x).__module__.partition(".")[0])
    return mod if hasattr(mod, "ascontiguousarray") and hasattr(mod, "asarray") else np


def _to_host(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)
