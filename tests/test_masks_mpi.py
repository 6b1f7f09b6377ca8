"""Masks across ranks: the ring and Ulysses with causal (top-left/bottom-right), sliding windows
and packed sequences equal single-rank float64 attention (the reference builds its mask from the
definitions), on every layout, uneven N and GQA, forward and backward; a window lets the ring
stop early; bad masks give one collective error. Runs serially and under mpiexec (MPI_SIZES)."""
import numpy as np
import pytest

from hpcattn import CollectiveError, LAYOUTS, ring_attention, shard, unshard
from hpcattn.context import context_attention, context_attention_backward
from hpcattn.reference import naive_attention, naive_attention_backward
from hpcattn.ring import ring_plan
from hpcattn.ring_backward import ring_attention_backward
from hpcattn.ulysses import ulysses_attention
from test_masks_unit import MASKS, mask_args
from test_ring_mpi import global_inputs  # one definition of the shared random inputs

MPI_SIZES = (2, 3, 4)

MPI = pytest.importorskip("mpi4py.MPI")

# the distributed matrix keeps to a few masks: each kind once and the full mixture
RING_MASKS = ["causal", "window", "causal-window", "varlen", "varlen-causal-window"]
N = 61  # not divisible by P nor 2P for P in 2..4


def _gathered(x, comm, layout, axis=1):
    return unshard(x, comm, layout, axis=axis)


@pytest.mark.mpi
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", RING_MASKS)
@pytest.mark.parametrize("h, hkv", [(4, 2), (3, 3)])
def test_ring_masks_equal_reference(layout, name, h, hkv):
    _forward_equals_reference(ring_attention, layout, name, h, hkv)


def _forward_equals_reference(run, layout, name, h, hkv):
    comm = MPI.COMM_WORLD
    args = mask_args(name, N)
    q, k, v = global_inputs(N, h=h, hkv=hkv)
    local = [shard(x, comm, layout) for x in (q, k, v)]
    out, lse = run(*local, comm, layout=layout, block_q=4, block_k=8, **args)
    ref, ref_lse = naive_attention(q, k, v, **args)
    assert np.abs(_gathered(out, comm, layout) - ref).max() < 1e-12
    assert np.abs(_gathered(lse, comm, layout, axis=2) - ref_lse).max() < 1e-12


@pytest.mark.mpi
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["causal-window", "varlen-causal", "window-left-only"])
def test_ring_masks_float32(layout, name):
    comm = MPI.COMM_WORLD
    args = mask_args(name, 300)
    q, k, v = global_inputs(300, b=1, h=4, hkv=1, d=16, dtype="float32")
    local = [shard(x, comm, layout) for x in (q, k, v)]
    out, _ = ring_attention(*local, comm, layout=layout, **args)
    assert out.dtype == np.float32
    ref, _ = naive_attention(q, k, v, **args)
    assert np.abs(_gathered(out, comm, layout) - ref).max() < 2e-5


@pytest.mark.mpi
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["causal-bottom-right", "window", "varlen-causal-window"])
def test_ulysses_masks_equal_reference(layout, name):
    _forward_equals_reference(ulysses_attention, layout, name, 6, 2)


def _grads_match(local_grads, comm, layout, ref_grads, tol):
    for got, want in zip(local_grads, ref_grads):
        assert np.abs(_gathered(got, comm, layout) - want).max() < tol


@pytest.mark.mpi
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", RING_MASKS)
def test_ring_backward_masks_equal_reference(layout, name):
    comm = MPI.COMM_WORLD
    args = mask_args(name, N)
    q, k, v = global_inputs(N, h=4, hkv=2)
    dout = np.random.default_rng(3).standard_normal(q.shape)
    local = [shard(x, comm, layout) for x in (q, k, v)]
    out, lse = ring_attention(*local, comm, layout=layout, block_q=4, block_k=8, **args)
    grads = ring_attention_backward(*local, out, lse, shard(dout, comm, layout), comm, layout=layout,
                                    block_q=4, block_k=8, **args)
    _grads_match(grads, comm, layout, naive_attention_backward(q, k, v, dout, **args), 1e-11)


@pytest.mark.mpi
@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["ring", "ulysses", "hybrid"])
@pytest.mark.parametrize("name", ["causal-window", "varlen-causal", "causal-bottom-right"])
def test_every_strategy_takes_masks_forward_and_backward(strategy, name):
    comm = MPI.COMM_WORLD
    layout = "zigzag"
    args = mask_args(name, N)
    grid = {"ulysses_size": 2 if comm.size % 2 == 0 else 1} if strategy == "hybrid" else {}
    q, k, v = global_inputs(N, h=4, hkv=2)
    dout = np.random.default_rng(4).standard_normal(q.shape)
    local = [shard(x, comm, layout) for x in (q, k, v)]
    out, lse = context_attention(*local, comm, strategy=strategy, layout=layout, **grid, **args)
    assert np.abs(_gathered(out, comm, layout) - naive_attention(q, k, v, **args)[0]).max() < 1e-12
    grads = context_attention_backward(*local, out, lse, shard(dout, comm, layout), comm,
                                       strategy=strategy, layout=layout, **grid, **args)
    _grads_match(grads, comm, layout, naive_attention_backward(q, k, v, dout, **args), 1e-11)


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_a_causal_window_stops_the_contiguous_ring_early():
    comm = MPI.COMM_WORLD
    n, size = 96, comm.size
    w = max(1, n // size // 2)            # less than one rank's block: one block back suffices
    args = dict(causal=True, window=(w, 0))
    q, k, v = global_inputs(n, h=2, hkv=1)
    stats = {}
    out, _ = ring_attention(*[shard(x, comm, "contiguous") for x in (q, k, v)], comm,
                            layout="contiguous", stats=stats, **args)
    assert np.abs(_gathered(out, comm, "contiguous") - naive_attention(q, k, v, **args)[0]).max() < 1e-12
    assert stats["steps"] == min(size, 2)
    assert stats["skipped"] == (1 if comm.rank == 0 and size > 1 else 0)
    # the backward runs the same steps; each dK/dV accumulator's last hop goes straight home
    dout = np.random.default_rng(2).standard_normal(q.shape)
    local = [shard(x, comm, "contiguous") for x in (q, k, v, dout)]
    out, lse = ring_attention(*local[:3], comm, layout="contiguous", **args)
    bstats = {}
    grads = ring_attention_backward(*local[:3], out, lse, local[3], comm, layout="contiguous",
                                    stats=bstats, **args)
    assert bstats["steps"] == min(size, 2)
    _grads_match(grads, comm, "contiguous", naive_attention_backward(q, k, v, dout, **args), 1e-11)


def test_ring_plan_agrees_on_every_rank_and_skips_hidden_blocks():
    """The plan is a function of (distribution, mask): every rank gets the same step count, and a
    block is marked useless only when no query of the rank can see any of its keys."""
    from hpcattn.layouts import Distribution
    from hpcattn.masks import make_mask
    from hpcattn.reference import visible_matrix

    for layout in LAYOUTS:
        for size in (2, 3, 5):
            for name in MASKS:
                args = mask_args(name, 200)
                if args["align"] != "top-left":
                    continue
                mask = make_mask(**args).bind(200, 200)
                dist = Distribution(200, size, layout)
                plans = [ring_plan(dist, mask, size, r) for r in range(size)]
                assert len({p[0] for p in plans}) == 1
                steps = plans[0][0]
                for r, (_, useful) in enumerate(plans):
                    for s in range(size):
                        seen = visible_matrix(dist.positions(r), dist.positions((r - s) % size),
                                              n_q=200, n_k=200, **args).any()
                        if s >= steps:
                            assert not seen, (layout, size, name, r, s)
                        elif not useful[s]:
                            assert not seen


@pytest.mark.mpi
@pytest.mark.timeout(60)
@pytest.mark.parametrize("spoil, message", [
    (dict(window=(-2, 0)), r"rank 1: window left=-2 is below -1"),
    (dict(cu_seqlens=[0, 30, 20, N]), r"rank 1: cu_seqlens is not strictly increasing"),
    (dict(cu_seqlens=[0, 30, N - 1]), r"^cu_seqlens ends at 60; expected it to end at the sequence length N=61"),
    (dict(cu_seqlens=[0, 31, N]), r"rank 1 was given another mask than rank 0"),
])
@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
def test_bad_masks_give_one_collective_error(spoil, message, strategy):
    comm = MPI.COMM_WORLD
    if comm.size < 2 and "rank 1" in message:
        pytest.skip("needs a second rank to disagree")
    q, k, v = (shard(x, comm, "zigzag") for x in global_inputs(N))
    kw = dict(causal=True, cu_seqlens=[0, 30, N])
    if comm.rank == 1 or "rank 1" not in message:
        kw.update(spoil)
    run = ring_attention if strategy == "ring" else ulysses_attention
    with pytest.raises(CollectiveError, match=message) as exc:
        run(q, k, v, comm, layout="zigzag", **kw)
    assert "\n" not in str(exc.value)


def _lse_match(got, want, tol):
    seen = np.isfinite(want)
    assert (np.isfinite(got) == seen).all()   # rows that see no key: -inf on both sides
    assert not seen.any() or np.abs(got[seen] - want[seen]).max() < tol


@pytest.mark.mpi
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
@pytest.mark.parametrize("nq, args", [
    (23, dict()), (23, dict(causal=True, align="bottom-right")),
    (80, dict(causal=True, align="bottom-right", window=(9, 0))), (80, dict(window=(5, 5))),
    (37, dict(causal=True)),
])
def test_cross_attention_across_ranks(layout, strategy, nq, args):
    """Queries and keys sharded independently (Nq != Nk), forward and backward; with Nq > Nk and
    bottom-right causal the first rows see no key (out 0, lse -inf, no gradient)."""
    comm = MPI.COMM_WORLD
    q = global_inputs(nq, h=4, hkv=2)[0]
    _, k, v = global_inputs(N, h=4, hkv=2)
    dout = np.random.default_rng(6).standard_normal(q.shape)
    lq, ldout = shard(q, comm, layout), shard(dout, comm, layout)
    lk, lv = shard(k, comm, layout), shard(v, comm, layout)
    out, lse = context_attention(lq, lk, lv, comm, strategy=strategy, layout=layout, block_q=4,
                                 block_k=8, **args)
    ref, ref_lse = naive_attention(q, k, v, **args)
    assert np.abs(_gathered(out, comm, layout) - ref).max() < 1e-12
    _lse_match(_gathered(lse, comm, layout, axis=2), ref_lse, 1e-12)
    dq, dk, dv = context_attention_backward(lq, lk, lv, out, lse, ldout, comm, strategy=strategy,
                                            layout=layout, block_q=4, block_k=8, **args)
    rdq, rdk, rdv = naive_attention_backward(q, k, v, dout, **args)
    for got, want in ((dq, rdq), (dk, rdk), (dv, rdv)):
        assert np.abs(_gathered(got, comm, layout) - want).max() < 1e-11


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_cross_attention_refusals_are_collective():
    comm = MPI.COMM_WORLD
    q = shard(global_inputs(23)[0], comm, "zigzag")
    k, v = (shard(x, comm, "zigzag") for x in global_inputs(N)[1:])
    with pytest.raises(CollectiveError, match="cu_seqlens with seqlen_q=23 != seqlen_k=61"):
        ring_attention(q, k, v, comm, layout="zigzag", cu_seqlens=[0, 30, N])
    with pytest.raises(CollectiveError, match="seqlen_q=23 != seqlen_k=61 with strategy 'hybrid'"):
        context_attention(q, k, v, comm, strategy="hybrid", ulysses_size=1, layout="zigzag")
