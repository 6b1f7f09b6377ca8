"""Moving data between MPI ranks without hanging or spinning (mpi4py only; knows nothing of
arrays, kernels or backends).

* ``RingComm`` sends a buffer to rank+1 and receives from rank-1, non-blocking, and is progressed
  between tiles of compute. Backends that need device staging subclass it (``hpcattn.gpu``).
* ``wait_all`` is how hpcattn waits on MPI requests: it tests them with a sleep between tests that
  grows from 50 us to 10 ms (a stalled peer costs ~nothing instead of a spinning core), and when
  nothing completes for ``HPCATTN_STALL_TIMEOUT`` seconds (default 600) it ends the job with one
  line naming the rank that did not answer (``MPI_Abort``): a stopped rank cannot hang a job.
* ``barrier``, ``allgather``, ``bcast``, ``allreduce``, ``gather``: collectives behind the same
  watchdog, for the places hpcattn waits on every rank (between cases, before a ring). They wait
  a grace period (max(1 s, 10 %)) beyond the timeout, so that a rank stuck in a ring step on the
  stalled rank speaks first and names it.
"""
from __future__ import annotations

import functools
import math
import os
import pickle
import sys
import time
from array import array

from .errors import HpcattnError

ENV_STALL_TIMEOUT = "HPCATTN_STALL_TIMEOUT"
DEFAULT_STALL_TIMEOUT_S = 600.0
# The sleep between tests grows slowly (x1.25): a rendezvous send needs a few test calls on both
# sides, and a fast growth would add up to one long sleep to a transfer that is almost done.
FIRST_SLEEP_S, MAX_SLEEP_S, SLEEP_GROWTH = 50e-6, 10e-3, 1.25
BARRIER_TAG = 32_001  # below the smallest MPI_TAG_UB the standard allows (32767); unused elsewhere
HINT = f"set {ENV_STALL_TIMEOUT} to wait longer"


def stall_timeout() -> float:
    """Seconds without progress after which a wait ends the job (``HPCATTN_STALL_TIMEOUT``)."""
    raw = os.environ.get(ENV_STALL_TIMEOUT, "").strip()
    if not raw:
        return DEFAULT_STALL_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value > 0:  # also refuses nan
        raise HpcattnError(f"{ENV_STALL_TIMEOUT}={raw!r}; expected a number of seconds > 0 "
                           f"(default {DEFAULT_STALL_TIMEOUT_S:g}, 'inf' waits forever)")
    return value


def seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}".removesuffix(".0")


def abort_job(comm, message: str) -> None:
    """Print ``hpcattn: error: rank R: <message>`` in one write and ``MPI_Abort`` the job."""
    sys.stderr.write(f"hpcattn: error: rank {comm.rank}: {message}\n")  # one write: no interleaving
    sys.stderr.flush()
    time.sleep(0.5)  # let the launcher forward the line before Abort tears the job down
    comm.Abort(1)


def wait_all(requests, describe, on_stall, timeout: float, *, clock=time.monotonic, sleep=time.sleep):
    """Wait until every request completes, sleeping between tests, never spinning.

    Each test also drives MPI's progress (MPICH's PyPI build moves messages only inside MPI
    calls). When no request completes for ``timeout`` seconds, ``on_stall(describe(pending,
    seconds))`` is called once, ``pending`` being the indices of the requests still open; the
    default ``on_stall`` aborts the job, one that returns lets the wait go on.
    """
    pending = list(range(len(requests)))
    delay, since, reported = FIRST_SLEEP_S, clock(), False
    while True:
        still = [i for i in pending if not requests[i].Test()]
        if not still:
            return
        now = clock()
        if len(still) < len(pending):  # progress: the clock and the back-off start over
            pending, delay, since, reported = still, FIRST_SLEEP_S, now, False
        elif not reported and now - since >= timeout:
            reported = True
            on_stall(describe(pending, now - since))
        sleep(delay)
        delay = min(delay * SLEEP_GROWTH, MAX_SLEEP_S)


class RingComm:
    """Send to rank+1 and receive from rank-1, non-blocking; ``progress()`` between tiles.

    MPICH's PyPI build only moves a posted message while some MPI call runs, so ``progress`` is
    called from the compute loop (``MPI.Request.Testall``); that is what hides the exchange.
    ``wait`` is ``wait_all``: a stalled neighbour ends the job after ``timeout`` seconds (default
    ``HPCATTN_STALL_TIMEOUT``) instead of hanging it; ``on_stall(message)`` replaces the abort.
    """

    def __init__(self, comm, *, timeout: float | None = None, on_stall=None):
        self.comm = comm
        self.right = (comm.rank + 1) % comm.size
        self.left = (comm.rank - 1) % comm.size
        self.reqs = []
        self.timeout = stall_timeout() if timeout is None else timeout
        self.on_stall = on_stall or functools.partial(abort_job, comm)
        self.exchanges = 0      # send_recv calls so far: names the exchange when no step is given
        self.where = ""

    def send_recv(self, send_buf, recv_buf, tag=0, *, step=None):
        """Post this step's exchange; ``step`` (the ring step) only names it in a stall message."""
        from mpi4py import MPI

        self.reqs = [self.comm.Irecv([recv_buf, MPI.BYTE], source=self.left, tag=tag),
                     self.comm.Isend([send_buf, MPI.BYTE], dest=self.right, tag=tag)]
        self.where = f"ring step {step}" if step is not None else f"ring exchange {self.exchanges}"
        if tag:
            self.where += f", tag {tag}"
        self.exchanges += 1

    def progress(self):
        from mpi4py import MPI

        if self.reqs:
            MPI.Request.Testall(self.reqs)

    def wait(self):
        if self.reqs:
            wait_all(self.reqs, self._stalled, self.on_stall, self.timeout)
        self.reqs = []

    def _stalled(self, pending, waited):
        if 0 in pending:  # the receive (see send_recv): the left neighbour's block is missing
            peer, what = self.left, f"no message from rank {self.left}"
        else:
            peer, what = self.right, f"rank {self.right} did not receive our block"
        return (f"{what} for {seconds(waited)} s ({self.where}); expected rank {peer} to answer "
                f"within the stall timeout of {seconds(self.timeout)} s (stopped, or far slower?); "
                f"{HINT}")


def _nonblocking(comm) -> bool:
    """Whether ``comm`` has MPI's non-blocking operations (every mpi4py communicator has; a
    stand-in communicator of a test may have only the blocking collectives, and gets those)."""
    return hasattr(comm, "Iallgather") and hasattr(comm, "Isend")


def barrier(comm, what: str, *, timeout: float | None = None, on_stall=None) -> None:
    """``comm.Barrier()`` behind the watchdog. ``what`` names the place in a stall message.

    Every rank tells rank 0 it arrived and rank 0 then releases them all, so rank 0 knows who did
    not arrive and names them; the other ranks wait a grace period longer before they blame
    rank 0 itself (which is then the stalled one, or has already aborted the job). Rank 0, too,
    waits a grace period beyond the stall timeout: a rank that is not here may itself be waiting
    in a ring step for the stalled one, and that rank's message names the right culprit.
    """
    from mpi4py import MPI

    size = comm.size
    if size == 1:
        return
    if not _nonblocking(comm):
        comm.Barrier()
        return
    timeout = stall_timeout() if timeout is None else timeout
    on_stall = on_stall or functools.partial(abort_job, comm)
    grace = max(1.0, 0.1 * timeout)
    token = bytearray(1)
    if comm.rank == 0:
        timeout += grace
        others = range(1, size)

        def absent(pending, waited):
            return _missing([others[i] for i in pending], waited, what, timeout)

        arrivals = [comm.Irecv([bytearray(1), MPI.BYTE], source=r, tag=BARRIER_TAG) for r in others]
        wait_all(arrivals, absent, on_stall, timeout)
        releases = [comm.Isend([token, MPI.BYTE], dest=r, tag=BARRIER_TAG) for r in others]
        wait_all(releases, absent, on_stall, timeout)
        return
    timeout += 2 * grace
    reqs = [comm.Isend([token, MPI.BYTE], dest=0, tag=BARRIER_TAG),
            comm.Irecv([bytearray(1), MPI.BYTE], source=0, tag=BARRIER_TAG)]
    wait_all(reqs, lambda pending, waited: _missing([0], waited, what, timeout), on_stall, timeout)


def _missing(ranks, waited, what, timeout):
    who = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
    return _missing_text(who, waited, what, timeout)


def _missing_text(who, waited, what, timeout):
    return (f"no answer from {who} for {seconds(waited)} s ({what}); expected every rank there "
            f"within {seconds(timeout)} s (stopped, or far slower?); {HINT}")


def _collective_stalled(comm, what, timeout):
    """describe() for a non-blocking collective: MPI does not say who is missing; on 2 ranks it
    can only be the other one (``barrier`` before it names a rank that never arrives)."""
    who = f"rank {1 - comm.rank}" if comm.size == 2 else "some rank"

    def describe(pending, waited):
        return _missing_text(who, waited, what, timeout)
    return describe


def _wait_one(comm, request, what, timeout, on_stall):
    wait_all([request], _collective_stalled(comm, what, timeout), on_stall, timeout)


def _guard(comm, what, timeout, on_stall):
    """(timeout, on_stall) filled in, after a ``barrier`` that names any rank that never comes."""
    timeout = stall_timeout() if timeout is None else timeout
    on_stall = on_stall or functools.partial(abort_job, comm)
    barrier(comm, what, timeout=timeout, on_stall=on_stall)
    return timeout, on_stall


def _gathered(comm, obj, what, root, timeout, on_stall):
    """Every rank's ``obj`` on every rank (``root=None``) or on ``root`` (elsewhere None), moved
    by non-blocking collectives (sizes, then the pickled bytes) so a wait never hangs."""
    from mpi4py import MPI

    if comm.size == 1:   # nobody to wait for; a copy, as MPI's pickled collectives give
        return [pickle.loads(pickle.dumps(obj))]
    if not _nonblocking(comm):
        return comm.allgather(obj) if root is None else comm.gather(obj, root=root)
    timeout, on_stall = _guard(comm, what, timeout, on_stall)
    data = pickle.dumps(obj)
    mine, sizes = array("q", [len(data)]), array("q", [0] * comm.size)
    to_all = root is None
    if to_all:
        request = comm.Iallgather([mine, MPI.INT64_T], [sizes, MPI.INT64_T])
    else:
        request = comm.Igather([mine, MPI.INT64_T], [sizes, MPI.INT64_T], root=root)
    _wait_one(comm, request, what, timeout, on_stall)
    offsets = [sum(sizes[:r]) for r in range(comm.size)]
    received = bytearray(max(1, sum(sizes)))
    recv = [received, (list(sizes), offsets), MPI.BYTE]
    if to_all:
        request = comm.Iallgatherv([data, MPI.BYTE], recv)
    else:
        request = comm.Igatherv([data, MPI.BYTE], recv, root=root)
    _wait_one(comm, request, what, timeout, on_stall)
    if not to_all and comm.rank != root:
        return None
    return [pickle.loads(received[o: o + n]) for o, n in zip(offsets, sizes)]


def allgather(comm, obj, what: str, *, timeout: float | None = None, on_stall=None) -> list:
    """``comm.allgather(obj)`` behind the watchdog; ``what`` names the place in a stall message."""
    return _gathered(comm, obj, what, None, timeout, on_stall)


def gather(comm, obj, what: str, root: int = 0, *, timeout: float | None = None, on_stall=None):
    """``comm.gather(obj, root)`` behind the watchdog (the list on ``root``, None elsewhere)."""
    return _gathered(comm, obj, what, root, timeout, on_stall)


def allreduce(comm, value, what: str, op=None, *, timeout: float | None = None, on_stall=None):
    """``comm.allreduce(value, op)`` (default ``MPI.SUM``) behind the watchdog."""
    from mpi4py import MPI

    return functools.reduce(op or MPI.SUM, allgather(comm, value, what, timeout=timeout, on_stall=on_stall))


def bcast(comm, obj, what: str, root: int = 0, *, timeout: float | None = None, on_stall=None):
    """``comm.bcast(obj, root)`` behind the watchdog."""
    from mpi4py import MPI

    if comm.size == 1:
        return obj
    if not _nonblocking(comm):
        return comm.bcast(obj, root=root)
    timeout, on_stall = _guard(comm, what, timeout, on_stall)
    data = pickle.dumps(obj) if comm.rank == root else b""
    size = array("q", [len(data)])
    _wait_one(comm, comm.Ibcast([size, MPI.INT64_T], root=root), what, timeout, on_stall)
    buf = bytearray(data) if comm.rank == root else bytearray(size[0])
    _wait_one(comm, comm.Ibcast([buf, MPI.BYTE], root=root), what, timeout, on_stall)
    return obj if comm.rank == root else pickle.loads(buf)
