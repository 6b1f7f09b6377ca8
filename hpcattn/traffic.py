"""Bytes a rank sends, counted where they enter MPI: ``CountingComm`` wraps an mpi4py
communicator and adds up every point-to-point send and every all-to-all's share for other ranks
(sub-communicators from ``Split`` count into the same total). ``hpcattn bench``'s strategy table
sets these measured bytes beside the model's prediction (``hpcattn.bench.strategies``).

Counted: the payload of point-to-point sends (the ring's blocks, the guarded barrier's one-byte
tokens) and of all-to-alls for *other* ranks. Not counted: the share of an all-to-all a rank
keeps, the small pickled allgathers of input checks, envelopes and MPI's own protocol bytes.
"""
from __future__ import annotations


def _nbytes(spec) -> int:
    """Bytes of an mpi4py buffer argument: ``[buf, type]``, ``[buf, (counts, displs), type]`` or a
    bare buffer (NumPy or CuPy array, bytes)."""
    buf = spec[0] if isinstance(spec, (list, tuple)) else spec
    return int(getattr(buf, "nbytes", None) or len(memoryview(buf).cast("B")))


class CountingComm:
    """An mpi4py communicator that counts the bytes this rank sends (``sent``); everything else
    is the wrapped communicator's."""

    def __init__(self, comm, counter: list | None = None):
        self._comm = comm
        self._counter = [0] if counter is None else counter  # shared with sub-communicators

    @property
    def sent(self) -> int:
        return self._counter[0]

    def reset(self) -> None:
        self._counter[0] = 0

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def _count(self, n: int) -> None:
        self._counter[0] += int(n)

    def Isend(self, buf, *args, **kw):
        self._count(_nbytes(buf))
        return self._comm.Isend(buf, *args, **kw)

    def Send(self, buf, *args, **kw):
        self._count(_nbytes(buf))
        return self._comm.Send(buf, *args, **kw)

    def Sendrecv(self, sendbuf, *args, **kw):
        self._count(_nbytes(sendbuf))
        return self._comm.Sendrecv(sendbuf, *args, **kw)

    def Alltoallv(self, sendbuf, recvbuf):
        # [buf, (counts, displs), type]: the counts are in units of type
        counts, unit = sendbuf[1][0], sendbuf[2].Get_size()
        self._count(unit * sum(c for r, c in enumerate(counts) if r != self._comm.rank))
        return self._comm.Alltoallv(sendbuf, recvbuf)

    def Split(self, *args, **kw):
        return CountingComm(self._comm.Split(*args, **kw), self._counter)

    def Free(self):
        return self._comm.Free()
