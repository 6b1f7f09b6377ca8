"""Which global sequence positions each rank holds: small pure functions and their inverses.

Three layouts of a length-``n`` sequence over ``size`` ranks, all with uneven lengths allowed:

* ``contiguous``: rank r holds one block ``[start_r, start_r + count_r)`` (remainders go to the
  first ranks, like mpi4py-fft's ``_blockdist``).
* ``zigzag``: the sequence is cut into ``2*size`` blocks; rank r holds blocks ``r`` and
  ``2*size-1-r``, so every rank gets one early and one late block and causal work balances.
* ``striped``: rank r holds positions ``r, r+size, r+2*size, ...``.

Within a rank, positions are always increasing. Every function here is pure and cheap; the
distributed ``shard``/``unshard`` live at the bottom and only move data.
"""
from __future__ import annotations

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
    xp = _xp(x)
    return xp.ascontiguousarray(xp.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0])


def unshard(x_local, comm=None, layout: str = "contiguous", axis: int = 1):
    """Gather every rank's shard into the global array (on every rank): the inverse of ``shard``."""
    from mpi4py import MPI

    comm = _comm(comm)
    check_layout(layout)
    xp = _xp(x_local)
    host = np.ascontiguousarray(np.moveaxis(_to_host(x_local), axis, 0))
    meta = comm.allgather((host.shape, host.dtype.str))
    rest = {(m[0][1:], m[1]) for m in meta}
    if len(rest) != 1:
        raise ValueError(
            f"unshard: ranks disagree on the other dimensions or dtype: {sorted(rest)}; expected one")
    counts = [m[0][0] for m in meta]
    n, size = sum(counts), comm.size
    want = [local_count(n, size, r, layout) for r in range(size)]
    if counts != want:
        raise ValueError(
            f"unshard: ranks hold {counts} positions but layout {layout!r} with N={n} assigns {want}")
    row = host.dtype.itemsize * int(np.prod(host.shape[1:], dtype=np.int64))
    gathered = np.empty((n,) + host.shape[1:], dtype=host.dtype)
    comm.Allgatherv([host, host.size * host.dtype.itemsize, MPI.BYTE],
                    [gathered, [c * row for c in counts], MPI.BYTE])
    out = np.empty_like(gathered)
    out[global_order(n, size, layout)] = gathered
    out = np.moveaxis(out, 0, axis)
    return xp.asarray(out)


def _xp(x):
    from .backend import array_module

    return array_module(x)


def _to_host(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)
