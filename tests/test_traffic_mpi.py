"""The bytes every strategy sends, counted at the MPI calls (hpcattn.traffic.CountingComm), equal
the model of hpcattn.bench.strategies to the guarded barrier's one-byte tokens, for every
layout, causal or not, uneven N and GQA; the counting communicator changes no result."""
import numpy as np
import pytest

from hpcattn import shard
from hpcattn.bench.strategies import grids, predicted_bytes
from hpcattn.context import context_attention
from hpcattn.layouts import Distribution
from hpcattn.traffic import CountingComm
from test_ring_mpi import global_inputs  # one definition of the shared random inputs

MPI_SIZES = (2, 3, 4)

MPI = pytest.importorskip("mpi4py.MPI")


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout, causal, n, h, hkv, dtype", [
    ("contiguous", False, 37, 4, 4, "float64"), ("zigzag", True, 50, 6, 2, "float32"),
    ("striped", True, 23, 3, 1, "float64")])
def test_counted_bytes_match_the_model(layout, causal, n, h, hkv, dtype):
    comm = MPI.COMM_WORLD
    q, k, v = global_inputs(n, b=2, h=h, hkv=hkv, d=8, dtype=dtype)
    local = [shard(x, comm, layout) for x in (q, k, v)]
    dist = Distribution(n, comm.size, layout)
    item = np.dtype(dtype).itemsize
    for strategy, u in grids(comm.size) + [("hybrid", 1), ("hybrid", comm.size)]:
        counting = CountingComm(comm)
        kw = dict(strategy=strategy, ulysses_size=u, causal=causal, layout=layout)
        out, lse = context_attention(*local, counting, **kw)
        want = predicted_bytes(strategy, u, dist, comm.rank, batch=2, heads=h, kv_heads=hkv,
                               head_dim=8, item=item, lse_item=item)
        # the input check's guarded barrier: rank 0 releases the others, the others report
        tokens = comm.size - 1 if comm.rank == 0 else 1
        assert counting.sent == want + tokens, (strategy, u, counting.sent, want)
        plain, plain_lse = context_attention(*local, comm, **kw)
        assert np.array_equal(out, plain) and np.array_equal(lse, plain_lse)


def test_counting_comm_counts_sends_and_other_ranks_share_of_alltoallv():
    comm = CountingComm(MPI.COMM_SELF)
    data = np.arange(10, dtype=np.float64)
    got = np.empty_like(data)
    req = comm.Irecv([got, MPI.BYTE], source=0, tag=3)
    comm.Isend([data, MPI.BYTE], dest=0, tag=3).Wait()
    req.Wait()
    assert comm.sent == data.nbytes and np.array_equal(got, data)
    comm.reset()
    # one rank: everything is its own share, nothing goes to another rank
    comm.Alltoallv([data.view(np.uint8), ([80], [0]), MPI.BYTE], [got.view(np.uint8), ([80], [0]), MPI.BYTE])
    assert comm.sent == 0
    sub = comm.Split(0, 0)
    assert isinstance(sub, CountingComm) and sub.size == 1
    sub.Free()
