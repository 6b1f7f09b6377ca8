"""The ring exchange over MPI (mpi4py only; knows nothing of arrays, kernels or backends).

``RingComm`` sends a buffer to rank+1 and receives from rank-1, non-blocking, and is progressed
between tiles of compute. Backends that need device staging subclass it (``hpcattn.gpu``).
"""
from __future__ import annotations


class RingComm:
    """Send to rank+1 and receive from rank-1, non-blocking; ``progress()`` between tiles.

    MPICH's PyPI build only moves a posted message while some MPI call runs, so ``progress`` is
    called from the compute loop (``MPI.Request.Testall``); that is what hides the exchange.
    """

    def __init__(self, comm):
        self.comm = comm
        self.right = (comm.rank + 1) % comm.size
        self.left = (comm.rank - 1) % comm.size
        self.reqs = []

    def send_recv(self, send_buf, recv_buf, tag=0):
        from mpi4py import MPI

        self.reqs = [self.comm.Irecv([recv_buf, MPI.BYTE], source=self.left, tag=tag),
                     self.comm.Isend([send_buf, MPI.BYTE], dest=self.right, tag=tag)]

    def progress(self):
        from mpi4py import MPI

        if self.reqs:
            MPI.Request.Testall(self.reqs)

    def wait(self):
        from mpi4py import MPI

        if self.reqs:
            MPI.Request.Waitall(self.reqs)
        self.reqs = []
