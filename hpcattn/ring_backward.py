"""Gradients of ring attention across MPI ranks.

K/V blocks travel the ring as in the forward (``hpcattn.ring``), and the dK/dV accumulators of
each block travel with it, one step behind: at step s rank r holds block ``src = r - s`` and
computes its own queries' share of that block's dK/dV into a zeroed buffer while the block's
accumulated dK/dV from ranks ``src .. r-1`` arrive from the left; after the step it adds its share
and, during the next step, sends the sum on. After P steps every accumulator has visited every
rank, and one last hop brings it home to its owner. Both exchanges are non-blocking and progressed
between tiles, so they hide behind compute. Partial dK/dV are carried in float32 (float64 for
float64 inputs), never rounded to a lower input precision, which keeps the error flat in P; dq
never travels.

Causal: a block whose keys all lie in the future of every local query is skipped (its
accumulator passes on unchanged). Every layout, uneven N and GQA work as in the forward.

The backend (``hpcattn.backend``, chosen once from q) supplies the per-block state, the exchange
and the step clock: on CPU ``blockwise_backward.BackwardState``, on GPU the backward kernels per
block with the global lse (``gpu.partial_backward.PerBlockBackward``; K/V travel in the input
precision, dK/dV in float32).
"""
from __future__ import annotations

import time

from . import backend, exchange
from .blockwise_backward import backward_input_error
from .errors import CollectiveError
from .ring import check_ring_inputs

KV_TAG, GRAD_TAG = 11, 12  # the two exchanges run at once between the same ranks


def check_backward_inputs(q, k, v, out, lse, dout, comm, layout, be=None):
    """Collective validation of everything the backward reads: the same CollectiveError on every
    rank (never a hang), or the sequence's Distribution. ``be``: q's backend (default
    ``backend.select(q)``)."""
    be = backend.select(q) if be is None else be
    dist = check_ring_inputs(q, k, v, comm, layout, be)
    errors = exchange.allgather(comm, backward_input_error(q, k, v, out, lse, dout, allowed=be.dtypes,
                                                           xp=be.xp),
                                "checking the ring backward's inputs")
    for r, err in enumerate(errors):
        if err:
            raise CollectiveError(f"rank {r}: {err}")
    return dist


def ring_attention_backward(q, k, v, out, lse, dout, comm=None, *, causal: bool = False,
                            layout: str = "contiguous", scale: float | None = None,
                            stats: dict | None = None, **block_kw):
    """``(dq, dk, dv)`` of this rank's shard, given the forward's ``out``/``lse`` shards (from
    ``ring_attention``) and ``dout = dL/dout`` for them; identical (to rounding) to single-rank
    ``attention_backward`` on the global arrays. NumPy or CuPy arrays (the backend is chosen once
    from q). ``stats`` (a dict) receives ``compute_s``, ``wait_s`` (time not covered by compute),
    ``steps`` and ``skipped`` like the forward's.
    """
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    be = backend.select(q)
    dist = check_backward_inputs(q, k, v, out, lse, dout, comm, layout, be)
    return ring_backward_over(q, k, v, out, lse, dout, comm, dist, be, causal=causal, scale=scale,
                              stats=stats, **block_kw)


def ring_backward_over(q, k, v, out, lse, dout, comm, dist, be, *, causal: bool, scale, stats=None,
                       **block_kw):
    """The backward ring on validated shards; ``dist`` as for ``hpcattn.ring.ring_over`` (any
    value with ``counts``, ``count(r)``, ``positions(r)``, e.g. the hybrid strategy's groups)."""
    size, rank = comm.size, comm.rank
    clock = be.clock()
    if size == 1:
        pos = dist.positions(0) if causal else None
        clock.start()
        grads = be.attention_backward(q, k, v, out, lse, dout, causal=causal, scale=scale, q_pos=pos,
                                      k_pos=pos, **block_kw)
        clock.computed()
        timing = {"compute_s": clock.stop()[0], "wait_s": 0.0, "skipped": 0}
    else:
        state = be.backward_state(q, out, lse, dout, k.shape[2], causal=causal, scale=scale,
                                  q_pos=dist.positions(rank), **block_kw)
        grads, timing = _ring(state, be, clock, k, v, comm, dist, causal)
    if stats is not None:
        stats.update(steps=size, **timing)
    return grads


def _ring(state, be, clock, k, v, comm, dist, causal):
    size, rank = comm.size, comm.rank
    q_pos = dist.positions(rank)
    q_last = int(q_pos.max()) if len(q_pos) else -1  # positions need not be sorted (hybrid groups)
    widest = max(dist.counts)
    xp = be.xp
    # K/V travel in the form (and precision) the state consumes; dK/dV always in acc_dtype
    kv_bufs = [xp.empty(state.packed_size(widest), dtype=state.packed_dtype) for _ in range(2)]
    # accumulated dK/dV going out, the previous ranks' sum coming in, this rank's own share
    sending, arriving, mine = (xp.zeros(state.grads_size(widest), dtype=state.acc_dtype) for _ in range(3))
    state.pack(k, v, kv_bufs[0])
    kv_ring, grad_ring = be.ring_comm(comm), be.ring_comm(comm)

    def progress():
        kv_ring.progress()
        grad_ring.progress()

    compute_s = 0.0
    skipped = 0
    t_start = time.perf_counter()
    for step in range(size):
        src = (rank - step) % size              # whose block we hold now
        n_src = dist.count(src)
        cur, nxt = kv_bufs[step % 2], kv_bufs[(step + 1) % 2]
        if step < size - 1:
            kv_ring.send_recv(cur[: state.packed_size(n_src)],
                              nxt[: state.packed_size(dist.count((src - 1) % size))], tag=KV_TAG,
                              step=step)
        if step > 0:  # last step's block goes on; this block's sum so far comes in
            grad_ring.send_recv(sending[: state.grads_size(dist.count((src + 1) % size))],
                                arriving[: state.grads_size(n_src)], tag=GRAD_TAG, step=step)
        k_pos = dist.positions(src)
        # step 0: nothing arrives, so this rank's share is the whole sum so far
        share = (sending if step == 0 else mine)[: state.grads_size(n_src)]
        # else every key is in every query's future
        visible = not (causal and (not len(k_pos) or q_last < int(k_pos.min())))
        clock.start()
        if visible:
            share.fill(0)
            state.add_block(cur, n_src, k_pos, share, progress=progress)
        else:
            skipped += 1
        clock.computed()
        kv_ring.wait()
        grad_ring.wait()
        compute_s += clock.stop()[0]
        if step > 0:
            if visible:
                clock.start()
                arriving[: share.size] += share
                clock.computed()
                compute_s += clock.stop()[0]
            sending, arriving = arriving, sending
    # the last hop: every rank holds the full sum of block rank+1; send it home, receive ours
    grad_ring.send_recv(sending[: state.grads_size(dist.count((rank + 1) % size))],
                        arriving[: state.grads_size(dist.count(rank))], tag=GRAD_TAG, step=size)
    clock.start()
    dq = state.dq()
    clock.computed()
    compute_s += clock.stop()[0]
    grad_ring.wait()
    dk, dv = state.unpack_grads(arriving, dist.count(rank))
    be.synchronize()
    wall = time.perf_counter() - t_start
    return (dq, dk, dv), {"compute_s": compute_s, "wait_s": max(0.0, wall - compute_s), "skipped": skipped}
