"""Every context-parallel strategy (ring, Ulysses, hybrid grids) equals single-rank float64
attention on the same shards, forward and backward, for every layout, causal or not, uneven N
and GQA/MQA; every strategy agrees with every other. Runs serially and under mpiexec
(MPI_SIZES)."""
import numpy as np
import pytest

from hpcattn import CollectiveError, HpcattnError, LAYOUTS, shard, unshard
from hpcattn.context import STRATEGIES, GroupDistribution, context_attention, context_attention_backward
from hpcattn.layouts import Distribution
from hpcattn.reference import naive_attention, naive_attention_backward
from test_ring_mpi import global_inputs  # one definition of the shared random inputs

MPI_SIZES = (2, 3, 4)

MPI = pytest.importorskip("mpi4py.MPI")


def grids(size):
    """(strategy, ulysses_size) for every strategy on ``size`` ranks: each divisor for hybrid."""
    out = [("ring", None), ("ulysses", None)]
    out += [("hybrid", u) for u in range(1, size + 1) if size % u == 0]
    return out


@pytest.mark.parametrize("n, size, u", [(10, 4, 2), (13, 6, 3), (7, 2, 2), (9, 3, 1)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_group_distribution_is_the_members_rows_in_order(n, size, u, layout):
    dist = Distribution(n, size, layout)
    grid = GroupDistribution(dist, u)
    assert grid.size == size // u and sum(grid.counts) == n
    got = np.concatenate([grid.positions(g) for g in range(grid.size)])
    assert np.array_equal(got, dist.global_order)


@pytest.mark.mpi
@pytest.mark.timeout(180)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, h, hkv", [(23, 4, 2), (64, 6, 1), (41, 8, 8)])
def test_every_strategy_equals_reference(layout, causal, n, h, hkv):
    comm = MPI.COMM_WORLD
    q, k, v = global_inputs(n, b=1, h=h, hkv=hkv)
    ref, ref_lse = naive_attention(q, k, v, causal=causal)
    local = [shard(x, comm, layout) for x in (q, k, v)]
    for strategy, u in grids(comm.size):
        stats = {}
        out, lse = context_attention(*local, comm, strategy=strategy, ulysses_size=u, causal=causal,
                                     layout=layout, stats=stats, block_q=8, block_k=8)
        err = np.abs(unshard(out, comm, layout) - ref).max()
        lerr = np.abs(unshard(lse, comm, layout, axis=2) - ref_lse).max()
        assert err < 1e-12 and lerr < 1e-12, (strategy, u, err, lerr)


@pytest.mark.mpi
@pytest.mark.timeout(180)
@pytest.mark.parametrize("layout, causal, n, h, hkv", [
    ("contiguous", False, 23, 4, 2), ("contiguous", True, 19, 3, 1), ("zigzag", True, 23, 4, 2),
    ("zigzag", False, 19, 3, 1), ("striped", True, 19, 3, 1), ("striped", False, 23, 4, 2)])
def test_every_strategy_backward_equals_reference(layout, causal, n, h, hkv):
    comm = MPI.COMM_WORLD
    q, k, v = global_inputs(n, b=2, h=h, hkv=hkv)
    dout = np.random.default_rng(7).standard_normal(q.shape)
    ref = naive_attention_backward(q, k, v, dout, causal=causal)
    local = [shard(x, comm, layout) for x in (q, k, v)]
    ldout = shard(dout, comm, layout)
    for strategy, u in grids(comm.size):
        out, lse = context_attention(*local, comm, strategy=strategy, ulysses_size=u, causal=causal,
                                     layout=layout)
        stats = {}
        grads = context_attention_backward(*local, out, lse, ldout, comm, strategy=strategy,
                                           ulysses_size=u, causal=causal, layout=layout,
                                           stats=stats, block_q=8, block_k=8)
        for name, got, want in zip("q k v".split(), grads, ref):
            err = np.abs(unshard(got, comm, layout) - want).max()
            assert err < 1e-12, (strategy, u, "d" + name, err)
        assert {"compute_s", "steps"} <= stats.keys(), (strategy, u, stats)


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_float32_strategies_agree_with_each_other():
    comm = MPI.COMM_WORLD
    q, k, v = global_inputs(257, b=1, h=4, hkv=2, d=16, dtype="float32")
    local = [shard(x, comm, "zigzag") for x in (q, k, v)]
    outs = [unshard(context_attention(*local, comm, strategy=s, ulysses_size=u, causal=True,
                                      layout="zigzag")[0], comm, "zigzag") for s, u in grids(comm.size)]
    for o in outs[1:]:
        assert o.dtype == np.float32 and np.abs(o - outs[0]).max() < 2e-6


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_ulysses_size_that_does_not_divide_p_is_one_collective_error():
    comm = MPI.COMM_WORLD
    q, k, v = global_inputs(16)
    local = [shard(x, comm) for x in (q, k, v)]
    with pytest.raises(CollectiveError, match=rf"ulysses_size={comm.size + 1} on P={comm.size} ranks; "
                                              rf"expected a positive divisor of {comm.size}"):
        context_attention(*local, comm, strategy="hybrid", ulysses_size=comm.size + 1)


@pytest.mark.mpi
@pytest.mark.timeout(180)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ring_and_hybrid_in_pieces_equal_reference(layout):
    """K/V in pieces: the ring, and the hybrid strategy's ring across groups; Ulysses refuses."""
    comm = MPI.COMM_WORLD
    q, k, v = global_inputs(37, b=1, h=4, hkv=2)
    dout = global_inputs(37, b=1, h=4, hkv=2, seed=1)[0]
    ref, _ = naive_attention(q, k, v, causal=True)
    ref_grads = naive_attention_backward(q, k, v, dout, causal=True)
    local = [shard(x, comm, layout) for x in (q, k, v)]
    ldout = shard(dout, comm, layout)
    for strategy, u in grids(comm.size):
        if strategy == "ulysses":
            with pytest.raises(HpcattnError, match=r"kv_pieces=3 is for the ring and hybrid"):
                context_attention(*local, comm, strategy=strategy, kv_pieces=3)
            out, lse = context_attention(*local, comm, strategy=strategy, layout=layout)
            with pytest.raises(HpcattnError, match=r"kv_pieces=2 is for the ring and hybrid"):
                context_attention_backward(*local, out, lse, ldout, comm, strategy=strategy,
                                           layout=layout, kv_pieces=2)
            continue
        kw = dict(strategy=strategy, ulysses_size=u, causal=True, layout=layout, block_q=8,
                  block_k=8, kv_pieces=3)
        out, lse = context_attention(*local, comm, **kw)
        assert np.abs(unshard(out, comm, layout) - ref).max() < 1e-12, (strategy, u)
        grads = context_attention_backward(*local, out, lse, ldout, comm, **kw)
        for g, want in zip(grads, ref_grads):
            assert np.abs(unshard(g, comm, layout) - want).max() < 1e-12, (strategy, u)


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match=r"strategy 'tree' is unknown; expected one of "
                                         + ", ".join(STRATEGIES)):
        context_attention(*global_inputs(4), MPI.COMM_SELF, strategy="tree")
    q, k, v = global_inputs(4)
    with pytest.raises(ValueError, match=r"strategy 'tree' is unknown"):
        context_attention_backward(q, k, v, q, np.zeros((1, 2, 4)), q, MPI.COMM_SELF, strategy="tree")
