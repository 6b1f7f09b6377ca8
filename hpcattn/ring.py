"""Exact ring attention across MPI ranks.

Every rank holds the queries, keys and values of its positions (see ``hpcattn.layouts``). For P
steps it computes blockwise attention of its queries against the K/V block it currently holds
while that block is already travelling to rank r+1 and the next one arrives from rank r-1
(non-blocking MPI, two buffers). The backend (``hpcattn.backend``, chosen once from q) supplies
the running state every arriving block is folded into, the exchange and the step clock: on CPU
one online-softmax state (``blockwise.PartialAttention``), on GPU per-block kernel results merged
by their log-sum-exp (``gpu.MergedAttention``).

Masks (causal, sliding windows, packed sequences: ``hpcattn.masks``) use global positions, so
the same loop serves every layout: a block with no visible tile for the local queries is skipped
(never computed; with ``zigzag`` or ``striped`` causal work balances), and the ring stops early
once no remaining block is visible to any rank (:func:`ring_plan`: every rank computes the same
number of steps from the distribution and the mask, no communication). A causal window of w on
the contiguous layout thus runs ceil(w / (N/P)) + 1 steps: O(N·w) work and traffic. (Zigzag and
striped spread every rank over the whole sequence, so windows there keep all P steps.)

``kv_pieces=p`` trades messages for memory: each rank's K/V block travels in p pieces, one
whole ring per piece, so the two ring buffers hold a piece (1/p of the largest block) instead of
a block. The same keys reach the same queries (only the order the online state folds them in
changes, so the rounding does); p times the messages, each 1/p the size.
"""
from __future__ import annotations

import numpy as np

from . import backend, exchange
from .errors import CollectiveError, HpcattnError
from .layouts import Distribution, check_layout
from .masks import NONE, chunk_bounds, make_mask, resolve
from .validate import check_qkv


def mask_spec(causal=False, window=None, cu_seqlens=None, align="top-left") -> dict:
    """The mask arguments of every strategy, as one value (``hpcattn.masks.make_mask``'s)."""
    return {"causal": causal, "window": window, "cu_seqlens": cu_seqlens, "align": align}


def _describe(q, k, v, be, spec, kv_pieces=1):
    """What every rank tells the others before the ring starts (and its local error, if any)."""
    digest = None
    try:
        check_qkv(q, k, v, allowed=be.dtypes, xp=be.xp,
                  find_nonfinite=getattr(be, "find_nonfinite", None))
        digest = make_mask(**spec).digest()
        check_pieces(kv_pieces)
        err = None
    except HpcattnError as exc:
        err = str(exc)
    return {"err": err, "q": tuple(getattr(q, "shape", ())), "kv": tuple(getattr(k, "shape", ())),
            "dtype": str(getattr(q, "dtype", "?")), "mask": digest, "pieces": repr(kv_pieces)}


def check_ring_inputs(q, k, v, comm, layout: str, be=None) -> Distribution:
    """Collective validation: raises the same CollectiveError on every rank, or returns how the
    sequence is distributed. ``be``: q's backend (default ``backend.select(q)``)."""
    return check_context_inputs(q, k, v, comm, layout, be)[0]


def check_context_inputs(q, k, v, comm, layout: str, be=None, spec=None, kv_pieces=1):
    """:func:`check_ring_inputs` plus the mask and the keys' distribution: ``(distribution of the
    queries, bound Mask, distribution of the keys)``, or the same CollectiveError on every rank (a
    bad window or cu_seqlens, ranks that disagree on them, a backend that cannot apply the mask).
    Queries and keys are sharded independently by ``layout`` (cross-attention: Nq != Nk); for
    self-attention the two distributions are one object. ``spec``: :func:`mask_spec`;
    ``kv_pieces``: the ring's (valid, and the same on every rank)."""
    check_layout(layout)
    size = comm.size
    be = backend.select(q) if be is None else be
    spec = mask_spec() if spec is None else spec
    infos = exchange.allgather(comm, _describe(q, k, v, be, spec, kv_pieces),
                               "checking the ring's inputs")
    for r, info in enumerate(infos):
        if info["err"]:
            raise CollectiveError(f"rank {r}: {info['err']}")
    ref = infos[0]
    for r, info in enumerate(infos):
        if info["mask"] != ref["mask"]:
            raise CollectiveError(f"rank {r} was given another mask than rank 0 (causal, window, "
                                  "cu_seqlens or align differ); expected the same on every rank")
        if info["pieces"] != ref["pieces"]:
            raise CollectiveError(f"rank {r} was given kv_pieces={info['pieces']} but rank 0 "
                                  f"kv_pieces={ref['pieces']}; expected the same on every rank")
    for r, info in enumerate(infos):
        if info["q"][0] != ref["q"][0] or info["q"][2:] != ref["q"][2:] or info["kv"][2:] != ref["kv"][2:] \
                or info["dtype"] != ref["dtype"]:
            raise CollectiveError(
                f"rank {r} has q {info['q']}, k/v {info['kv']}, {info['dtype']} but rank 0 has q {ref['q']}, "
                f"k/v {ref['kv']}, {ref['dtype']}; expected equal batch, heads, head_dim and dtype on every rank")
    dists = []
    for what, key in (("sequence", "q"), ("key sequence", "kv")):
        counts = [info[key][1] for info in infos]
        n = sum(counts)
        if n < size:
            raise CollectiveError(f"{what} length N={n} is smaller than the number of ranks P={size}; "
                                  "expected N >= P")
        dist = Distribution(n, size, layout)
        if (problem := dist.mismatch(counts)) is not None:
            raise CollectiveError(f"{problem}{'' if key == 'q' else ' (keys)'}; shard inputs with "
                                  "hpcattn.shard")
        dists.append(dist)
    dist, dist_k = dists[0], (dists[0] if dists[1] == dists[0] else dists[1])
    try:   # every rank holds the same spec and lengths here: the same outcome everywhere
        mask = make_mask(**spec).bind(dist.n, dist_k.n)
        backend.mask_kwargs(be, mask)
    except HpcattnError as exc:
        raise CollectiveError(str(exc)) from None
    return dist, mask, dist_k


def ring_plan(dist, mask, size: int, rank: int, dist_k=None) -> tuple[int, list]:
    """``(steps, useful)``: how many ring steps every rank runs, and for each of ``rank``'s steps
    whether its key block may hold a key visible to its queries. The same on every rank (computed
    from the distributions of queries and keys (``dist_k``, default ``dist``) and the mask alone):
    the ring stops after the last step any rank can use, and a rank computes nothing on a step
    whose block the mask hides from it entirely."""
    if mask.trivial:
        return size, [True] * size
    dist_k = dist if dist_k is None else dist_k

    def bounds_of(d):
        return [np.asarray(chunk_bounds(d.positions(r), 16), np.int64).reshape(-1, 4)
                for r in range(size)]

    q_bounds = bounds_of(dist)
    k_bounds = q_bounds if dist_k is dist else bounds_of(dist_k)

    def useful(r, step):
        qb, kb = q_bounds[r], k_bounds[(r - step) % size]
        if not len(qb) or not len(kb):
            return False
        return bool((mask.classify(qb[:, 2, None], qb[:, 3, None], kb[None, :, 2],
                                   kb[None, :, 3]) != NONE).any())

    table = [[useful(r, s) for s in range(size)] for r in range(size)]
    steps = max((s + 1 for row in table for s, u in enumerate(row) if u), default=1)
    return steps, table[rank][:steps]


def ring_attention(q, k, v, comm=None, *, causal: bool = False, layout: str = "contiguous",
                   scale: float | None = None, stats: dict | None = None, window=None,
                   cu_seqlens=None, align: str = "top-left", kv_pieces: int = 1, **block_kw):
    """Exact attention over the global sequence whose shards the ranks of ``comm`` hold.

    ``q``, ``k``, ``v`` are this rank's shards, (batch, n_local, heads, head_dim), laid out by
    ``layout`` (use ``hpcattn.shard``). Returns this rank's ``(out, lse)`` rows, identical (to
    rounding) to single-rank ``attention`` on the global arrays. ``window``, ``cu_seqlens`` and
    ``align`` as for ``hpcattn.attention`` (global positions; ``cu_seqlens`` over the whole
    packed sequence, the same on every rank). If ``stats`` is a dict it receives ``compute_s``
    (time in attention), ``wait_s`` (time blocked in the exchange), ``steps`` (ring steps run:
    fewer than P when a window lets the ring stop early) and ``skipped`` (steps whose block
    the mask hid entirely). ``kv_pieces``: send each K/V block in this many pieces (a positive
    integer; see the module docstring): the ring buffers shrink to one piece.
    """
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    be = backend.select(q)
    dist, mask, dist_k = check_context_inputs(q, k, v, comm, layout, be,
                                              mask_spec(causal, window, cu_seqlens, align),
                                              kv_pieces)
    return ring_over(q, k, v, comm, dist, be, causal=causal, scale=scale, stats=stats, mask=mask,
                     dist_k=dist_k, kv_pieces=kv_pieces, **block_kw)


def check_pieces(kv_pieces) -> int:
    """``kv_pieces`` as an int, or HpcattnError (every rank passes the same value)."""
    if isinstance(kv_pieces, bool) or not isinstance(kv_pieces, (int, np.integer)) or kv_pieces < 1:
        raise HpcattnError(f"kv_pieces={kv_pieces!r} is invalid; expected a positive integer")
    return int(kv_pieces)


def piece_table(dist, size: int, pieces: int) -> tuple[list, int]:
    """``(bounds, widest)``: ``bounds[r][j]`` is ``(start, stop)`` of piece j of rank r's block,
    the ``pieces`` near-equal runs its ``dist.count(r)`` keys travel in (the same on every rank;
    a run is empty when the block has fewer keys than pieces), and ``widest`` the longest run,
    which sizes the ring's buffers."""
    bounds = [[(j * n // pieces, (j + 1) * n // pieces) for j in range(pieces)]
              for n in (dist.count(r) for r in range(size))]
    return bounds, max(hi - lo for row in bounds for lo, hi in row)


def ring_over(q, k, v, comm, dist, be, *, causal: bool, scale, stats=None, mask=None, dist_k=None,
              kv_pieces: int = 1, **block_kw):
    """The ring loop on validated shards. ``dist`` says which rows rank r of ``comm`` holds:
    ``counts``, ``count(r)``, ``positions(r)`` (a ``layouts.Distribution``, or any value with
    those, e.g. the groups of ranks of the hybrid strategy; positions need not be sorted);
    ``dist_k`` the same for the keys (default ``dist``; cross-attention when they differ).
    ``mask``: a ``hpcattn.masks.Mask`` (bound to the global lengths unless it is); None: plain
    ``causal``."""
    size, rank = comm.size, comm.rank
    pieces = check_pieces(kv_pieces)
    dist_k = dist if dist_k is None else dist_k
    mask = resolve(mask, causal, dist.n, dist_k.n)
    kw = backend.mask_kwargs(be, mask)
    t_compute = t_wait = 0.0
    skipped = 0
    steps = size
    clock = be.clock()
    if size == 1:
        q_pos, k_pos = (None, None) if mask.trivial else (dist.positions(0), dist_k.positions(0))
        clock.start()
        out, lse = be.attention(q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos, **kw, **block_kw)
        clock.computed()
        t_compute, _ = clock.stop()
    else:
        steps, useful = ring_plan(dist, mask, size, rank, dist_k)
        ring = be.ring_comm(comm)
        q_pos = dist.positions(rank)
        # the blocks travel in the form the per-rank kernel consumes (for NumPy: [k, 1], [v, 1]
        # per head), and every block is folded into one running state: no per-step output
        part = be.partial(q, k.shape[2], scale=scale, q_pos=q_pos, **kw, **block_kw)
        bounds, widest = piece_table(dist_k, size, pieces)
        bufs = [be.xp.empty(part.packed_size(widest), dtype=k.dtype) for _ in range(2)]
        for piece in range(pieces):   # one whole ring per piece (one piece: the plain ring)
            lo, hi = bounds[rank][piece]
            part.pack(k[:, lo:hi], v[:, lo:hi], bufs[0])
            for step in range(steps):
                src = (rank - step) % size          # whose block's piece we hold now
                cur, nxt = bufs[step % 2], bufs[(step + 1) % 2]
                lo, hi = bounds[src][piece]
                if step < steps - 1:
                    next_lo, next_hi = bounds[(src - 1) % size][piece]
                    ring.send_recv(cur[: part.packed_size(hi - lo)],
                                   nxt[: part.packed_size(next_hi - next_lo)],
                                   step=step if pieces == 1 else f"{step} (piece {piece})")
                clock.start()
                if not useful[step]:
                    skipped += piece == 0        # the mask hides every key from every query
                elif hi > lo:
                    part.add_packed(cur[: part.packed_size(hi - lo)], hi - lo,
                                    dist_k.positions(src)[lo:hi], progress=ring.progress)
                clock.computed()
                ring.wait()
                busy, idle = clock.stop()
                t_compute += busy
                t_wait += idle
        del cur, nxt
        bufs.clear()  # the ring buffers are free before the output exists (peak memory)
        clock.start()
        out, lse = part.result()
        clock.computed()
        t_compute += clock.stop()[0]
    if stats is not None:
        stats.update(compute_s=t_compute, wait_s=t_wait, steps=steps, skipped=skipped)
    return out, lse
