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

Masks (causal, windows, packed sequences) as in the forward: a block the mask hides from every
local query is skipped (its accumulator passes on unchanged), and the ring runs the forward's
number of steps (``ring.ring_plan``); when that is S < P, the last hop of each accumulator goes
from rank ``owner + S - 1`` straight home. Every layout, uneven N and GQA work as in the forward.
``kv_pieces=p`` (as in the forward) runs one such ring per piece of every block, so the K/V
buffers and the three dK/dV accumulators hold a piece, not a block.

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
from .masks import resolve
from .ring import check_context_inputs, mask_spec, piece_table, ring_plan

KV_TAG, GRAD_TAG = 11, 12  # the two exchanges run at once between the same ranks


def check_backward_inputs(q, k, v, out, lse, dout, comm, layout, be=None):
    """Collective validation of everything the backward reads: the same CollectiveError on every
    rank (never a hang), or the sequence's Distribution. ``be``: q's backend (default
    ``backend.select(q)``)."""
    return check_backward_context(q, k, v, out, lse, dout, comm, layout, be)[0]


def check_backward_context(q, k, v, out, lse, dout, comm, layout, be=None, spec=None, kv_pieces=1):
    """:func:`check_backward_inputs` plus the mask (``ring.mask_spec``) and ``kv_pieces``:
    ``(dist, bound mask, dist_k)`` as ``ring.check_context_inputs`` gives them."""
    be = backend.select(q) if be is None else be
    dist, mask, dist_k = check_context_inputs(q, k, v, comm, layout, be, spec, kv_pieces)
    errors = exchange.allgather(comm, backward_input_error(q, k, v, out, lse, dout, allowed=be.dtypes,
                                                           xp=be.xp,
                                                           find_nonfinite=getattr(be, "find_nonfinite", None)),
                                "checking the ring backward's inputs")
    for r, err in enumerate(errors):
        if err:
            raise CollectiveError(f"rank {r}: {err}")
    return dist, mask, dist_k


def ring_attention_backward(q, k, v, out, lse, dout, comm=None, *, causal: bool = False,
                            layout: str = "contiguous", scale: float | None = None,
                            stats: dict | None = None, window=None, cu_seqlens=None,
                            align: str = "top-left", kv_pieces: int = 1, **block_kw):
    """``(dq, dk, dv)`` of this rank's shard, given the forward's ``out``/``lse`` shards (from
    ``ring_attention``) and ``dout = dL/dout`` for them; identical (to rounding) to single-rank
    ``attention_backward`` on the global arrays. NumPy or CuPy arrays (the backend is chosen once
    from q). The mask (``causal``, ``window``, ``cu_seqlens``, ``align``) must be the forward's.
    ``stats`` (a dict) receives ``compute_s``, ``wait_s`` (time not covered by compute),
    ``steps`` and ``skipped`` like the forward's. ``kv_pieces`` as for ``ring_attention`` (it
    need not be the forward's).
    """
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    be = backend.select(q)
    dist, mask, dist_k = check_backward_context(q, k, v, out, lse, dout, comm, layout, be,
                                                mask_spec(causal, window, cu_seqlens, align),
                                                kv_pieces)
    return ring_backward_over(q, k, v, out, lse, dout, comm, dist, be, causal=causal, scale=scale,
                              stats=stats, mask=mask, dist_k=dist_k, kv_pieces=kv_pieces, **block_kw)


def ring_backward_over(q, k, v, out, lse, dout, comm, dist, be, *, causal: bool, scale, stats=None,
                       mask=None, dist_k=None, kv_pieces: int = 1, **block_kw):
    """The backward ring on validated shards; ``dist`` as for ``hpcattn.ring.ring_over`` (any
    value with ``counts``, ``count(r)``, ``positions(r)``, e.g. the hybrid strategy's groups);
    ``mask`` and ``dist_k`` (the keys' distribution) as for ``ring_over``."""
    size, rank = comm.size, comm.rank
    dist_k = dist if dist_k is None else dist_k
    mask = resolve(mask, causal, dist.n, dist_k.n)
    kw = backend.mask_kwargs(be, mask)
    clock = be.clock()
    steps = size
    if size == 1:
        q_pos, k_pos = (None, None) if mask.trivial else (dist.positions(0), dist_k.positions(0))
        clock.start()
        grads = be.attention_backward(q, k, v, out, lse, dout, scale=scale, q_pos=q_pos, k_pos=k_pos,
                                      **kw, **block_kw)
        clock.computed()
        timing = {"compute_s": clock.stop()[0], "wait_s": 0.0, "skipped": 0}
    else:
        state = be.backward_state(q, out, lse, dout, k.shape[2], scale=scale,
                                  q_pos=dist.positions(rank), **kw, **block_kw)
        steps, useful = ring_plan(dist, mask, size, rank, dist_k)
        grads, timing = _ring(state, be, clock, k, v, comm, dist_k, steps, useful, kv_pieces)
    if stats is not None:
        stats.update(steps=steps, **timing)
    return grads


def _ring(state, be, clock, k, v, comm, dist, steps, useful, pieces=1):
    """The loop, one ring per piece of every block; ``dist`` is the KEYS' distribution (the
    queries stay in ``state``)."""
    size, rank = comm.size, comm.rank
    bounds, widest = piece_table(dist, size, pieces)

    def count(r, piece):
        lo, hi = bounds[r][piece]
        return hi - lo

    xp = be.xp
    # K/V travel in the form (and precision) the state consumes; dK/dV always in acc_dtype
    kv_bufs = [xp.empty(state.packed_size(widest), dtype=state.packed_dtype) for _ in range(2)]
    # accumulated dK/dV going out, the previous ranks' sum coming in, this rank's own share
    sending, arriving, mine = (xp.zeros(state.grads_size(widest), dtype=state.acc_dtype) for _ in range(3))
    kv_ring, grad_ring = be.ring_comm(comm), be.ring_comm(comm)

    def progress():
        kv_ring.progress()
        grad_ring.progress()

    compute_s = 0.0
    skipped = 0
    dk = dv = None  # this rank's block's, filled piece by piece
    t_start = time.perf_counter()
    for piece in range(pieces):
        lo, hi = bounds[rank][piece]
        state.pack(k[:, lo:hi], v[:, lo:hi], kv_bufs[0])
        grad_ring.right, grad_ring.left = (rank + 1) % size, (rank - 1) % size
        name = (lambda s: s) if pieces == 1 else (lambda s: f"{s} (piece {piece})")
        for step in range(steps):
            src = (rank - step) % size          # whose block's piece we hold now
            n_src = count(src, piece)
            cur, nxt = kv_bufs[step % 2], kv_bufs[(step + 1) % 2]
            if step < steps - 1:
                kv_ring.send_recv(cur[: state.packed_size(n_src)],
                                  nxt[: state.packed_size(count((src - 1) % size, piece))],
                                  tag=KV_TAG, step=name(step))
            if step > 0:  # last step's block goes on; this block's sum so far comes in
                grad_ring.send_recv(sending[: state.grads_size(count((src + 1) % size, piece))],
                                    arriving[: state.grads_size(n_src)], tag=GRAD_TAG,
                                    step=name(step))
            slo, shi = bounds[src][piece]
            k_pos = dist.positions(src)[slo:shi]
            # step 0: nothing arrives, so this rank's share is the whole sum so far
            share = (sending if step == 0 else mine)[: state.grads_size(n_src)]
            visible = useful[step]              # else the mask hides every key from every query
            clock.start()
            if visible or step == 0:
                share.fill(0)                   # (step 0 unseen: a zero sum starts the ring)
            if visible and n_src:
                state.add_block(cur, n_src, k_pos, share, progress=progress)
            skipped += not visible and piece == 0
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
        # the last hop: every rank holds the full sum of piece ``piece`` of block rank-(steps-1)
        # (rank+1 after all P steps); send it home, receive ours from rank+(steps-1)
        home = (rank - (steps - 1)) % size
        grad_ring.right, grad_ring.left = home, (rank + steps - 1) % size
        grad_ring.send_recv(sending[: state.grads_size(count(home, piece))],
                            arriving[: state.grads_size(count(rank, piece))], tag=GRAD_TAG,
                            step=name(steps))
        if piece == pieces - 1:   # dq while the last accumulator travels home
            clock.start()
            dq = state.dq()
            clock.computed()
            compute_s += clock.stop()[0]
        grad_ring.wait()
        dk_p, dv_p = state.unpack_grads(arriving, count(rank, piece))
        if pieces == 1:
            dk, dv = dk_p, dv_p
            continue
        if dk is None:
            dk, dv = (xp.empty(k.shape, dtype=dk_p.dtype) for _ in range(2))
        dk[:, lo:hi], dv[:, lo:hi] = dk_p, dv_p
        del dk_p, dv_p
    be.synchronize()
    wall = time.perf_counter() - t_start
    return (dq, dk, dv), {"compute_s": compute_s, "wait_s": max(0.0, wall - compute_s), "skipped": skipped}
