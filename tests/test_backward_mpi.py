"""Ring backward across ranks equals the single-rank backward; its float32 error does not grow
with the number of ranks; bad input on one rank is the same error on every rank.

Runs serially (1 rank) and under ``mpiexec -n P python -m pytest --with-mpi`` (see MPI_SIZES);
tests/test_backward_ranks.py collects the float32 error at P = 1, 2, 4, 8 into one table.
"""
import numpy as np
import pytest

from hpcattn import LAYOUTS, attention, ring_attention, shard, unshard
from hpcattn.blockwise_backward import attention_backward
from hpcattn.errors import CollectiveError
from hpcattn.reference import naive_attention_backward
from hpcattn.ring_backward import ring_attention_backward

MPI_SIZES = (2, 3, 4)

MPI = pytest.importorskip("mpi4py.MPI")


@pytest.fixture(params=["world", "dup", "self"])
def comm(request):
    c = {"world": MPI.COMM_WORLD, "self": MPI.COMM_SELF}.get(request.param) or MPI.COMM_WORLD.Dup()
    yield c
    if request.param == "dup":
        c.Free()


def global_inputs(n, b=2, h=4, hkv=2, d=8, dtype="float64", seed=0):
    rng = np.random.default_rng([seed, n, h, hkv, d])  # same on every rank
    return (rng.standard_normal((b, n, h, d)).astype(dtype),
            rng.standard_normal((b, n, hkv, d)).astype(dtype),
            rng.standard_normal((b, n, hkv, d)).astype(dtype),
            rng.standard_normal((b, n, h, d)).astype(dtype))


def ring_gradients(q, k, v, dout, comm, layout, causal, stats=None, **block_kw):
    """Shard the global arrays, run the forward and backward rings, gather the gradients."""
    lq, lk, lv, ldo = (shard(x, comm, layout) for x in (q, k, v, dout))
    out, lse = ring_attention(lq, lk, lv, comm, causal=causal, layout=layout, **block_kw)
    grads = ring_attention_backward(lq, lk, lv, out, lse, ldo, comm, causal=causal, layout=layout,
                                    stats=stats, **block_kw)
    for g, x in zip(grads, (lq, lk, lv)):
        assert g.shape == x.shape and g.dtype == x.dtype
    return [unshard(g, comm, layout) for g in grads]


def max_relative_error(got, want):
    scale = max(float(np.abs(w).max()) for w in want)
    return max(float(np.abs(g - w).max()) for g, w in zip(got, want)) / scale


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, h, hkv", [(4, 4, 2), (11, 6, 1), (64, 4, 4), (203, 8, 2)])  # uneven N
def test_ring_backward_equals_single_rank(comm, layout, causal, n, h, hkv):
    q, k, v, dout = global_inputs(n, h=h, hkv=hkv)
    got = ring_gradients(q, k, v, dout, comm, layout, causal, block_q=8, block_k=16)
    out, lse = attention(q, k, v, causal=causal)
    single = attention_backward(q, k, v, out, lse, dout, causal=causal)
    assert max_relative_error(got, single) < 1e-12


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_error_does_not_grow_with_ranks(layout):
    """At whatever P the launcher uses: the float32 ring's max error against float64 is within
    2x of the single-rank float32 backward's (the dK/dV partial sums travel in float32)."""
    comm = MPI.COMM_WORLD
    q, k, v, dout = global_inputs(384, b=1, h=4, hkv=2, d=32, dtype="float32", seed=1)
    ref = naive_attention_backward(q, k, v, dout, causal=True)
    stats = {}
    ring = ring_gradients(q, k, v, dout, comm, layout, True, stats=stats)
    out, lse = attention(q, k, v, causal=True)
    single = attention_backward(q, k, v, out, lse, dout, causal=True)
    assert stats["steps"] == comm.size and stats["compute_s"] > 0
    assert max_relative_error(ring, ref) <= 2 * max_relative_error(single, ref)


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_causal_contiguous_skips_future_blocks():
    comm = MPI.COMM_WORLD
    q, k, v, dout = global_inputs(40)
    stats = {}
    ring_gradients(q, k, v, dout, comm, "contiguous", True, stats=stats)
    # rank r sees the blocks of ranks 0..r only; the others are skipped, not computed
    assert stats["skipped"] == comm.size - 1 - comm.rank
    assert set(stats) >= {"compute_s", "wait_s", "steps", "skipped"}


def _local_inputs(layout="zigzag"):
    comm = MPI.COMM_WORLD
    q, k, v, dout = (shard(x, comm, layout) for x in global_inputs(16))
    out, lse = ring_attention(q, k, v, comm, layout=layout)
    return dict(q=q, k=k, v=v, out=out, lse=lse, dout=dout)


@pytest.mark.mpi
@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, spoil, message", [
    ("dout", lambda x: x[..., :4], r"dout has shape \(2, \d+, 4, 4\); expected \(2, \d+, 4, 8\) to match q"),
    ("out", lambda x: x[:, 1:], r"out has shape \(2, \d+, 4, 8\); expected"),
    ("lse", lambda x: x[:, :, 1:], r"lse has shape \(2, 4, \d+\); expected"),
    ("dout", lambda x: x.astype(np.float32), r"dout has dtype float32; expected q's dtype float64"),
])
def test_bad_shapes_on_one_rank_raise_the_same_error_everywhere(name, spoil, message):
    comm = MPI.COMM_WORLD
    args = _local_inputs()
    bad = comm.size - 1
    if comm.rank == bad:
        args[name] = spoil(args[name])
    with pytest.raises(CollectiveError, match=rf"rank {bad}: {message}") as info:
        ring_attention_backward(**args, comm=comm, layout="zigzag")
    assert "\n" not in str(info.value)
    comm.Barrier()  # everyone got here: no hang


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_nan_in_dout_on_one_rank_is_reported_on_all_ranks():
    comm = MPI.COMM_WORLD
    args = _local_inputs()
    bad = comm.size - 1
    if comm.rank == bad:
        args["dout"] = args["dout"].copy()
        args["dout"][0, 0, 1, 2] = np.nan
    with pytest.raises(CollectiveError, match=rf"rank {bad}: dout contains NaN or Inf \(first at index \(0, 0, 1, 2\)\)"):
        ring_attention_backward(**args, comm=comm, layout="zigzag")
    comm.Barrier()


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_bad_qkv_on_one_rank_uses_the_forward_checks():
    comm = MPI.COMM_WORLD
    args = _local_inputs()
    if comm.rank == 0:
        args["v"] = args["v"].copy()
        args["v"][0, 0, 0, 0] = np.inf
    with pytest.raises(CollectiveError, match=r"rank 0: v contains NaN or Inf"):
        ring_attention_backward(**args, comm=comm, layout="zigzag")
    comm.Barrier()


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_ring_backward_with_the_gpu_running_state_on_the_host(layout, dtype, tol, monkeypatch):
    """The CUDA backend's backward state (the backward per key block with the global lse; dq
    summed, each block's dk/dv in float32 travelling the ring), with the NumPy backward standing
    in for the CUDA kernels, gives the ring the reference gradients."""
    from hpcattn import backend
    from hpcattn.gpu.partial_backward import PerBlockBackward

    asked = set()

    def numpy_kernel(*args, grad_dtype=None, **kw):
        asked.add(grad_dtype)
        return tuple(g.astype(grad_dtype or g.dtype) for g in attention_backward(*args, **kw))

    def per_block(self, q, out, lse, dout, kv_heads, *, causal, scale, q_pos, **block_kw):
        return PerBlockBackward(q, out, lse, dout, kv_heads, causal=causal, scale=scale, q_pos=q_pos,
                                backward=numpy_kernel, xp=np, **block_kw)

    comm = MPI.COMM_WORLD
    q, k, v, dout = global_inputs(77, h=4, hkv=2, dtype=dtype)
    monkeypatch.setattr(backend.NumpyBackend, "backward_state", per_block)
    got = ring_gradients(q, k, v, dout, comm, layout, True, block_q=8, block_k=8)
    ref = naive_attention_backward(q, k, v, dout, causal=True)
    assert max_relative_error(got, ref) <= tol
    if comm.size > 1:  # one rank runs the plain per-rank backward, no ring state
        assert asked == ({None} if dtype == "float64" else {"float32"})


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pieces", [2, 5])
@pytest.mark.parametrize("n, h, hkv", [(11, 6, 1), (203, 8, 2)])  # 11 on 4 ranks: empty pieces
def test_ring_backward_in_pieces_equals_single_rank(layout, causal, pieces, n, h, hkv):
    comm = MPI.COMM_WORLD
    q, k, v, dout = global_inputs(n, h=h, hkv=hkv)
    stats, plain = {}, {}
    got = ring_gradients(q, k, v, dout, comm, layout, causal, stats=stats, block_q=8, block_k=16,
                         kv_pieces=pieces)
    out, lse = attention(q, k, v, causal=causal)
    single = attention_backward(q, k, v, out, lse, dout, causal=causal)
    assert max_relative_error(got, single) < 1e-12
    ring_gradients(q, k, v, dout, comm, layout, causal, stats=plain)
    assert (stats["steps"], stats["skipped"]) == (plain["steps"], plain["skipped"])


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_ring_backward_in_pieces_with_a_window_and_packed_sequences():
    """A window stops the ring early (the last hop goes straight home), per piece."""
    comm = MPI.COMM_WORLD
    n = 120
    q, k, v, dout = global_inputs(n, b=1, h=4, hkv=2)
    mask = dict(causal=True, window=(20, 0), cu_seqlens=np.array([0, 17, 90, n]))
    import hpcattn

    out, lse = attention(q, k, v, **mask)
    single = hpcattn.attention_backward(q, k, v, out, lse, dout, **mask)
    lq, lk, lv, ldo = (shard(x, comm, "contiguous") for x in (q, k, v, dout))
    lout, llse = ring_attention(lq, lk, lv, comm, **mask, kv_pieces=3)
    stats = {}
    grads = ring_attention_backward(lq, lk, lv, lout, llse, ldo, comm, **mask, kv_pieces=3,
                                    stats=stats)
    got = [unshard(g, comm, "contiguous") for g in grads]
    assert max_relative_error(got, single) < 1e-12
    if comm.size == 4:
        assert stats["steps"] < comm.size     # the window stopped the ring early


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_ring_backward_in_pieces_holds_a_piece_not_a_block():
    """The K/V buffers and the three dK/dV accumulators shrink to a piece (traced peak)."""
    import tracemalloc

    comm = MPI.COMM_WORLD
    n = 1024 * comm.size
    q, k, v, dout = global_inputs(n, b=1, h=4, hkv=4, d=32, dtype="float32")
    lq, lk, lv, ldo = (shard(x, comm, "contiguous") for x in (q, k, v, dout))
    out, lse = ring_attention(lq, lk, lv, comm)
    n_loc = n // comm.size
    travelling = 2 * 2 * 4 * n_loc * 33 * 4 + 3 * 2 * 4 * n_loc * 32 * 4   # K/V; dK/dV x 3
    peaks = {}
    for pieces in (1, 4):
        tracemalloc.start()
        ring_attention_backward(lq, lk, lv, out, lse, ldo, comm, kv_pieces=pieces)
        peaks[pieces] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[1] - peaks[4] > 0.6 * travelling, (peaks, travelling)
