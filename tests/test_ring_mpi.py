"""Ring attention across ranks equals single-rank attention and the float64 reference.

Runs serially (1 rank) and under ``mpiexec -n P python -m pytest --with-mpi`` (see MPI_SIZES).
"""
import numpy as np
import pytest

import hpcattn
from hpcattn import CollectiveError, LAYOUTS, ring_attention, shard, unshard
from hpcattn.reference import naive_attention

MPI_SIZES = (2, 3, 4)

MPI = pytest.importorskip("mpi4py.MPI")


@pytest.fixture(params=["world", "dup", "self"])
def comm(request):
    """COMM_WORLD, a Dup() of it (made for this test and freed after it) and COMM_SELF."""
    if request.param != "dup":
        yield {"world": MPI.COMM_WORLD, "self": MPI.COMM_SELF}[request.param]
        return
    dup = MPI.COMM_WORLD.Dup()
    try:
        yield dup
    finally:
        dup.Free()


def global_inputs(n, b=2, h=4, hkv=2, d=8, dtype="float64", seed=0):
    rng = np.random.default_rng([seed, n, h, hkv])  # same on every rank
    return (rng.standard_normal((b, n, h, d)).astype(dtype),
            rng.standard_normal((b, n, hkv, d)).astype(dtype),
            rng.standard_normal((b, n, hkv, d)).astype(dtype))


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [4, 11, 64, 203])  # uneven: not divisible by P nor 2P
def test_ring_equals_reference(comm, layout, causal, n):
    q, k, v = global_inputs(n)
    local = [shard(x, comm, layout) for x in (q, k, v)]
    out, lse = ring_attention(*local, comm, causal=causal, layout=layout, block_q=16, block_k=16)
    out_g = unshard(out, comm, layout)
    lse_g = unshard(lse, comm, layout, axis=2)
    ref, ref_lse = naive_attention(q, k, v, causal=causal)
    assert np.abs(out_g - ref).max() < 1e-12
    assert np.abs(lse_g - ref_lse).max() < 1e-12


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ring_float32_equals_single_rank(layout):
    comm = MPI.COMM_WORLD
    q, k, v = global_inputs(300, b=1, h=4, hkv=1, d=16, dtype="float32")
    single, single_lse = hpcattn.attention(q, k, v, causal=True)
    local = [shard(x, comm, layout) for x in (q, k, v)]
    stats = {}
    out, lse = ring_attention(*local, comm, causal=True, layout=layout, stats=stats)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    assert np.abs(unshard(out, comm, layout) - single).max() < 2e-6
    assert stats["steps"] == comm.size


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_causal_contiguous_skips_future_blocks():
    comm = MPI.COMM_WORLD
    q, k, v = global_inputs(40)
    stats = {}
    ring_attention(*[shard(x, comm, "contiguous") for x in (q, k, v)], comm, causal=True,
                   layout="contiguous", stats=stats)
    # rank r sees blocks of ranks 0..r only; the others are skipped, not computed
    assert stats["skipped"] == comm.size - 1 - comm.rank


@pytest.mark.mpi
@pytest.mark.timeout(60)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_unshard_round_trip_is_exact(comm, layout):
    n = 29
    b, h, d = 2, 3, 5
    bb, nn, hh, dd = np.meshgrid(np.arange(b), np.arange(n), np.arange(h), np.arange(d), indexing="ij")
    x = (((bb * 1_000_003 + nn) * 1009 + hh) * 101 + dd).astype(np.int64)
    for axis in (1, 2):
        xa = np.moveaxis(x, 1, axis).copy()
        back = unshard(shard(xa, comm, layout, axis=axis), comm, layout, axis=axis)
        assert back.dtype == xa.dtype and np.array_equal(back, xa)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_mismatched_shapes_raise_the_same_error_everywhere():
    comm = MPI.COMM_WORLD
    q, k, v = [shard(x, comm, "contiguous") for x in global_inputs(16)]
    if comm.rank == 1:
        q = np.ascontiguousarray(q[..., :4])  # head_dim 4 on rank 1 only
        k = np.ascontiguousarray(k[..., :4])
        v = np.ascontiguousarray(v[..., :4])
    with pytest.raises(CollectiveError, match=r"rank 1 has q \(2, \d+, 4, 4\).*expected equal batch"):
        ring_attention(q, k, v, comm)
    comm.Barrier()  # everyone got here: no hang


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_nan_on_one_rank_is_reported_on_all_ranks():
    comm = MPI.COMM_WORLD
    q, k, v = [shard(x, comm, "zigzag") for x in global_inputs(16)]
    bad = comm.size - 1
    if comm.rank == bad:
        v = v.copy()
        v[0, 0, 0, 0] = np.nan
    with pytest.raises(CollectiveError, match=rf"rank {bad}: v contains NaN or Inf"):
        ring_attention(q, k, v, comm, layout="zigzag")
    comm.Barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_too_few_positions_and_wrong_sharding():
    comm = MPI.COMM_WORLD
    one = np.ones((1, 1 if comm.rank == 0 else 0, 1, 2))
    with pytest.raises(CollectiveError, match=rf"N=1 is smaller than the number of ranks P={comm.size}"):
        ring_attention(one, one, one, comm)
    q, k, v = global_inputs(4 * comm.size)
    q, k, v = [x[:, :2 if comm.rank == 0 else 5] for x in (q, k, v)]  # 2 vs 5 rows: no layout does that
    with pytest.raises(CollectiveError, match="layout 'striped'.*assigns"):
        ring_attention(q, k, v, comm, layout="striped")
    comm.Barrier()


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ring_with_the_gpu_running_state_on_the_host(layout, monkeypatch):
    """The CUDA backend's running state (attention per block, merged by log-sum-exp), with the
    NumPy kernel standing in for the CUDA one, gives the same ring result as the NumPy state."""
    from hpcattn import backend, blockwise
    from hpcattn.gpu.partial import MergedAttention

    def merged(self, q, kv_heads, *, causal, scale, q_pos, **block_kw):
        return MergedAttention(q, kv_heads, causal=causal, scale=scale, q_pos=q_pos,
                               attend=blockwise.attention, xp=np, **block_kw)

    comm = MPI.COMM_WORLD
    q, k, v = global_inputs(77)
    monkeypatch.setattr(backend.NumpyBackend, "partial", merged)
    local = [shard(x, comm, layout) for x in (q, k, v)]
    out, lse = ring_attention(*local, comm, causal=True, layout=layout, block_q=8, block_k=8)
    ref, ref_lse = naive_attention(q, k, v, causal=True)
    assert np.abs(unshard(out, comm, layout) - ref).max() < 1e-12
    assert np.abs(unshard(lse, comm, layout, axis=2) - ref_lse).max() < 1e-12


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pieces", [2, 3, 7])
@pytest.mark.parametrize("n", [11, 203])  # 11 on 4 ranks: blocks of 2-3 keys, empty pieces
def test_ring_in_pieces_equals_reference(layout, causal, pieces, n):
    comm = MPI.COMM_WORLD
    q, k, v = global_inputs(n)
    local = [shard(x, comm, layout) for x in (q, k, v)]
    stats = {}
    out, lse = ring_attention(*local, comm, causal=causal, layout=layout, block_q=16, block_k=16,
                              kv_pieces=pieces, stats=stats)
    ref, ref_lse = naive_attention(q, k, v, causal=causal)
    assert np.abs(unshard(out, comm, layout) - ref).max() < 1e-12
    assert np.abs(unshard(lse, comm, layout, axis=2) - ref_lse).max() < 1e-12
    plain = {}
    ring_attention(*local, comm, causal=causal, layout=layout, stats=plain)
    assert (stats["steps"], stats["skipped"]) == (plain["steps"], plain["skipped"])  # blocks, not pieces


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_ring_in_pieces_float32_window_and_packed(layout):
    """The fused float32 state, a window and packed sequences, with K/V in pieces."""
    comm = MPI.COMM_WORLD
    n = 400
    q, k, v = global_inputs(n, b=1, h=4, hkv=2, d=16, dtype="float32")
    cu = np.array([0, 37, 250, n])
    single, _ = hpcattn.attention(q, k, v, causal=True, window=(60, 0), cu_seqlens=cu)
    local = [shard(x, comm, layout) for x in (q, k, v)]
    out, _ = ring_attention(*local, comm, causal=True, layout=layout, window=(60, 0),
                            cu_seqlens=cu, kv_pieces=3)
    assert np.abs(unshard(out, comm, layout) - single).max() < 2e-6


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_ring_in_pieces_holds_a_piece_not_a_block():
    """The two ring buffers shrink to a piece: the traced peak falls by about (1 - 1/p) of them."""
    import tracemalloc

    comm = MPI.COMM_WORLD
    n = 1024 * comm.size
    q, k, v = [shard(x, comm, "contiguous") for x in global_inputs(n, b=1, h=4, hkv=4, d=32,
                                                                       dtype="float32")]
    buffers = 2 * 2 * 4 * (n // comm.size) * 33 * 4     # two packed [k, 1], [v, 1] blocks
    peaks = {}
    for pieces in (1, 4):
        tracemalloc.start()
        ring_attention(q, k, v, comm, kv_pieces=pieces)
        peaks[pieces] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[1] - peaks[4] > 0.6 * buffers, (peaks, buffers)


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_bad_kv_pieces_is_one_error_everywhere():
    comm = MPI.COMM_WORLD
    local = [shard(x, comm, "contiguous") for x in global_inputs(16)]
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(CollectiveError, match=rf"kv_pieces={bad!r} is invalid; expected a positive"):
            ring_attention(*local, comm, kv_pieces=bad)
    if comm.size > 1:
        with pytest.raises(CollectiveError, match=r"rank 1 was given kv_pieces=3 but rank 0 kv_pieces=2"):
            ring_attention(*local, comm, kv_pieces=3 if comm.rank == 1 else 2)
    comm.Barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("pieces", [1, 4])
def test_memory_model_counts_the_pieces(pieces):
    """The up-front estimate of a ring case with K/V in pieces bounds its traced peak (and is
    not far above it): the same rule as the single-rank estimate test."""
    import tracemalloc

    from hpcattn.cases import AttentionCase, case_memory, run_attention_case
    from hpcattn.layouts import Distribution

    comm = MPI.COMM_WORLD
    case = AttentionCase(seq_len=2048 * comm.size, heads=4, head_dim=32, kv_pieces=pieces)
    host = case_memory(case, Distribution(case.seq_len, comm.size, "contiguous"), comm.rank)[0]
    run_attention_case(case, comm)   # lazy imports out of the measured run
    tracemalloc.start()
    try:
        run_attention_case(case, comm)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= host.total <= 1.3 * peak, (host.total, peak, host.parts())
