"""The stall watchdog under mpiexec: guarded collectives give what MPI's give, and a rank that is
late (here: asleep on purpose) is named by the rank that waits on it, in the ring and at a
barrier; with an ``on_stall`` that only records, the wait then finishes normally.

Runs serially (1 rank) and under ``mpiexec -n P python -m pytest --with-mpi`` (see MPI_SIZES).
A real stopped rank (SIGSTOP) and the abort are in test_watchdog_signals.py.
"""
import re
import time

import numpy as np
import pytest

from hpcattn import exchange

MPI = pytest.importorskip("mpi4py.MPI")
MPI_SIZES = (2, 3)
LATE = 1          # the rank that is late
TIMEOUT = 0.2     # short: the late rank sleeps several times longer


@pytest.fixture
def comm():
    return MPI.COMM_WORLD


@pytest.mark.mpi
def test_guarded_collectives_equal_mpis(comm):
    obj = {"rank": comm.rank, "payload": list(range(5 * comm.rank))}
    last = comm.size - 1
    assert exchange.allgather(comm, obj, "test") == comm.allgather(obj)
    assert exchange.gather(comm, obj, "test", root=last) == comm.gather(obj, root=last)
    assert exchange.bcast(comm, obj, "test", root=last) == comm.bcast(obj, root=last)
    assert exchange.allreduce(comm, comm.rank + 1, "test") == comm.allreduce(comm.rank + 1)
    assert exchange.allreduce(comm, comm.rank, "test", op=MPI.MAX) == comm.size - 1
    exchange.barrier(comm, "test")


@pytest.mark.mpi(min_size=2)
def test_ring_names_the_late_left_neighbour_then_finishes(comm):
    stalls = []
    ring = exchange.RingComm(comm, timeout=TIMEOUT, on_stall=stalls.append)
    send = np.full(64, comm.rank, dtype=np.float64)
    recv = np.empty_like(send)
    comm.Barrier()
    if comm.rank == LATE:
        time.sleep(6 * TIMEOUT)
    ring.send_recv(send, recv, step=0)
    ring.wait()
    assert (recv == (comm.rank - 1) % comm.size).all()
    everyone = comm.allgather(stalls)
    waiting_on_late = (LATE + 1) % comm.size
    assert len(everyone[waiting_on_late]) == 1, everyone
    for msgs in everyone:
        for msg in msgs:
            assert re.match(rf"no message from rank {LATE} for \d+(\.\d)? s \(ring step 0\); expected rank "
                            rf"{LATE} to answer within the stall timeout of 0\.2 s", msg), msg
            assert msg.endswith("; set HPCATTN_STALL_TIMEOUT to wait longer")


@pytest.mark.mpi(min_size=2)
def test_barrier_root_names_the_rank_that_did_not_arrive(comm):
    stalls = []
    comm.Barrier()
    if comm.rank == LATE:
        # longer than rank 0's timeout plus grace (0.2 + 1 s), shorter than the others' (0.2 + 2 s)
        time.sleep(1.7)
    exchange.barrier(comm, "between cases 3 and 4", timeout=TIMEOUT, on_stall=stalls.append)
    everyone = comm.allgather(stalls)
    assert len(everyone[0]) == 1, everyone
    assert re.match(rf"no answer from rank {LATE} for \d+(\.\d)? s \(between cases 3 and 4\); expected "
                    r"every rank there within 1\.2 s", everyone[0][0]), everyone[0][0]
    assert everyone[LATE] == []
