"""Ulysses (all-to-all) context parallelism: re-shard from sequence to heads, attend, shard back.

Every rank holds its positions of q/k/v (any ``hpcattn.layouts`` layout, uneven N). One
``Alltoallv`` per tensor gives each rank the WHOLE sequence for a subset of the heads; it runs
ordinary per-rank attention on them (global positions carry the mask: causal, windows, packed
sequences, so the received rows need no reordering), and one more all-to-all returns every rank its own rows for all heads.
Communication per rank is about 4·N·H·d/P elements each way, independent of the causal mask.

How heads are split (:func:`head_plan`), any head count on any number of ranks:

* ``kv_heads >= P``: the kv heads are split into near-equal contiguous blocks and each rank gets
  the query heads of its kv heads, so GQA groups stay whole and nothing is replicated.
* ``kv_heads < P`` (e.g. MQA on 4 ranks): the query heads are split instead and each rank
  receives, per query head, a copy of the kv head it reads (kv replicated as needed).
* ``heads < P``: ranks without a head send and receive but compute nothing.
"""
from __future__ import annotations

import numpy as np

from . import backend
from .layouts import blockdist
from .ring import check_context_inputs, mask_spec


def head_plan(heads: int, kv_heads: int, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each rank, ``(query heads, kv heads)`` it attends over, as index arrays. When kv heads
    are replicated, the kv array has one entry per query head (a plain multi-head problem)."""
    group = heads // kv_heads
    plan = []
    for r in range(size):
        if kv_heads >= size:
            c, s = blockdist(kv_heads, size, r)
            kv = np.arange(s, s + c)
            qh = np.arange(s * group, (s + c) * group)
        else:
            c, s = blockdist(heads, size, r)
            qh = np.arange(s, s + c)
            kv = qh // group
        plan.append((qh, kv))
    return plan


def _alltoallv(comm, pieces, shapes, dtype):
    """Send ``pieces[j]`` to rank j, receive an array of ``shapes[i]`` from every rank i."""
    from mpi4py import MPI

    item = np.dtype(dtype).itemsize
    send = np.concatenate([np.ascontiguousarray(p).reshape(-1) for p in pieces]) if pieces else \
        np.empty(0, dtype)
    sizes = [int(np.prod(s)) for s in shapes]
    recv = np.empty(sum(sizes), dtype)
    scounts = [p.size * item for p in pieces]
    rcounts = [s * item for s in sizes]
    comm.Alltoallv([send.view(np.uint8), (scounts, _displs(scounts)), MPI.BYTE],
                   [recv.view(np.uint8), (rcounts, _displs(rcounts)), MPI.BYTE])
    out, at = [], 0
    for s, n in zip(shapes, sizes):
        out.append(recv[at:at + n].reshape(s))
        at += n
    return out


def _displs(counts):
    return [0, *np.cumsum(counts)[:-1].tolist()] if counts else []


class _Relayout:
    """The two all-to-alls of one Ulysses call: rows of this rank (all heads) <-> the whole
    sequence for this rank's heads, for (b, n, heads, d) tensors and (b, heads, n) lse."""

    def __init__(self, comm, counts, plan, be):
        self.comm, self.plan, self.be = comm, plan, be
        self.counts = tuple(counts)  # rows each rank of ``comm`` holds, in rank order
        self.mine = plan[comm.rank]

    def to_heads(self, x, which: int):
        """(b, n_local, H or Hkv, d) -> (b, N, my heads, d); rows in rank order."""
        x = self.be.to_host(x)
        b, _, _, d = x.shape
        pieces = [x[:, :, p[which]] for p in self.plan]
        mine = len(self.mine[which])
        shapes = [(b, c, mine, d) for c in self.counts]
        return np.concatenate(_alltoallv(self.comm, pieces, shapes, x.dtype), axis=1)

    def lse_to_heads(self, lse):
        lse = self.be.to_host(lse)
        b = lse.shape[0]
        pieces = [lse[:, p[0]] for p in self.plan]
        shapes = [(b, len(self.mine[0]), c) for c in self.counts]
        return np.concatenate(_alltoallv(self.comm, pieces, shapes, lse.dtype), axis=2)

    def to_rows(self, full, which: int, heads: int, *, add: bool = False):
        """(b, N, my heads, d) -> (b, n_local, heads, d); ``add`` sums replicated kv heads."""
        b, _, _, d = full.shape
        cuts = np.cumsum(self.counts)[:-1]
        pieces = np.split(full, cuts, axis=1)
        n_local = self.counts[self.comm.rank]
        shapes = [(b, n_local, len(p[which]), d) for p in self.plan]
        got = _alltoallv(self.comm, pieces, shapes, full.dtype)
        out = np.zeros((b, n_local, heads, d), full.dtype)
        for p, g in zip(self.plan, got):
            if add:
                np.add.at(out, (slice(None), slice(None), p[which]), g)
            else:
                out[:, :, p[which]] = g
        return out

    def lse_to_rows(self, full, heads: int):
        b = full.shape[0]
        cuts = np.cumsum(self.counts)[:-1]
        pieces = np.split(full, cuts, axis=2)
        n_local = self.counts[self.comm.rank]
        shapes = [(b, len(p[0]), n_local) for p in self.plan]
        out = np.empty((b, heads, n_local), full.dtype)
        for p, g in zip(self.plan, _alltoallv(self.comm, pieces, shapes, full.dtype)):
            out[:, p[0]] = g
        return out


def ulysses_attention(q, k, v, comm=None, *, causal: bool = False, layout: str = "contiguous",
                      scale: float | None = None, stats: dict | None = None, window=None,
                      cu_seqlens=None, align: str = "top-left", **block_kw):
    """Exact attention over the global sequence whose shards the ranks of ``comm`` hold, by
    all-to-all over heads. Same contract as :func:`hpcattn.ring_attention` (masks included):
    this rank's ``(out, lse)`` rows. ``stats`` receives ``bytes_sent`` (this rank, both
    all-to-alls) and ``compute_s``."""
    import time

    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    be = backend.select(q)
    dist, mask, dist_k = check_context_inputs(q, k, v, comm, layout, be,
                                              mask_spec(causal, window, cu_seqlens, align))
    b, _, h, d = q.shape
    plan = head_plan(h, k.shape[2], comm.size)
    move, move_k = _relayouts(comm, dist, dist_k, plan, be)
    # the received rows are in rank order; positions say where they sit
    q_pos, k_pos = (None, None) if mask.trivial else (dist.global_order, dist_k.global_order)
    kw = backend.mask_kwargs(be, mask)

    compute = [0.0]  # the per-rank kernel alone, not the all-to-alls around it

    def attend(qf, kf, vf):
        t = time.perf_counter()
        res = be.attention(be.to_device(qf), be.to_device(kf), be.to_device(vf), scale=scale,
                           q_pos=q_pos, k_pos=k_pos, **kw, **block_kw)
        be.synchronize()
        compute[0] += time.perf_counter() - t
        return res

    t0 = time.perf_counter()
    out, lse, sent = over_heads(q, k, v, move, attend, move_k)
    if stats is not None:
        stats.update(wall_s=time.perf_counter() - t0, compute_s=compute[0], bytes_sent=sent,
                     steps=2, skipped=0)
    return out, lse


def _relayouts(comm, dist, dist_k, plan, be):
    """The re-layouts of the query-side and the key-side tensors (one object for self-attention)."""
    move = _Relayout(comm, dist.counts, plan, be)
    return move, (move if dist_k is dist else _Relayout(comm, dist_k.counts, plan, be))


def over_heads(q, k, v, move: _Relayout, attend, move_k: _Relayout | None = None):
    """Re-shard q/k/v to heads with ``move`` (k/v with ``move_k``, default ``move``: their rows
    may differ in cross-attention), ``attend(q, k, v) -> (out, lse)`` on the rows of every rank
    of ``move.comm`` for this rank's heads, shard back. Returns ``(out, lse, bytes this rank
    sent)`` (including the share it keeps)."""
    be = move.be
    move_k = move if move_k is None else move_k
    b, _, h, d = q.shape
    qf, kf, vf = move.to_heads(q, 0), move_k.to_heads(k, 1), move_k.to_heads(v, 1)
    n_all = sum(move.counts)
    if len(move.mine[0]):
        o, l = attend(qf, kf, vf)
        o, l = be.to_host(o), be.to_host(l)
    else:  # more ranks than heads: this one only relays
        o = np.zeros((b, n_all, 0, d), qf.dtype)
        l = np.zeros((b, 0, n_all), np.float64 if qf.dtype == np.float64 else np.float32)
    out = move.to_rows(o, 0, h)
    lse = move.lse_to_rows(l, h)
    item = q.dtype.itemsize
    sent = b * d * item * (q.shape[1] * h + k.shape[1] * 2 * sum(len(p[1]) for p in move.plan)) \
        + n_all * b * len(move.mine[0]) * (d * item + l.dtype.itemsize)
    return be.to_device(out), be.to_device(lse), int(sent)


def ulysses_attention_backward(q, k, v, out, lse, dout, comm=None, *, causal: bool = False,
                               layout: str = "contiguous", scale: float | None = None,
                               stats: dict | None = None, window=None, cu_seqlens=None,
                               align: str = "top-left", **block_kw):
    """``(dq, dk, dv)`` of this rank's shard by all-to-all over heads: q, k, v, out, dout and lse
    go to the head-sharded layout, every rank runs the per-rank backward over the whole sequence
    for its heads, and the gradients come back (kv heads replicated for ``kv_heads < P`` have
    their copies' gradients summed). Same contract as ``hpcattn.ring_attention_backward``."""
    import time

    from .ring_backward import check_backward_context

    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    be = backend.select(q)
    dist, mask, dist_k = check_backward_context(q, k, v, out, lse, dout, comm, layout, be,
                                                mask_spec(causal, window, cu_seqlens, align))
    b, _, h, d = q.shape
    hkv = k.shape[2]
    plan = head_plan(h, hkv, comm.size)
    move, move_k = _relayouts(comm, dist, dist_k, plan, be)
    full = [m.to_heads(x, which) for x, which, m in ((q, 0, move), (k, 1, move_k), (v, 1, move_k),
                                                     (out, 0, move), (dout, 0, move))]
    lse_full = move.lse_to_heads(lse)
    q_pos, k_pos = (None, None) if mask.trivial else (dist.global_order, dist_k.global_order)
    kw = backend.mask_kwargs(be, mask)
    t0 = time.perf_counter()
    if len(move.mine[0]):
        dev = [be.to_device(x) for x in (*full[:4], lse_full, full[4])]
        grads = [be.to_host(g) for g in be.attention_backward(*dev, scale=scale, q_pos=q_pos,
                                                               k_pos=k_pos, **kw, **block_kw)]
    else:
        grads = [np.zeros_like(full[0]), np.zeros_like(full[1]), np.zeros_like(full[2])]
    compute = time.perf_counter() - t0
    replicated = hkv < comm.size
    dq = move.to_rows(grads[0], 0, h)
    dk = move_k.to_rows(grads[1], 1, hkv, add=replicated)
    dv = move_k.to_rows(grads[2], 1, hkv, add=replicated)
    if stats is not None:
        stats.update(compute_s=compute, steps=2, skipped=0)
    return be.to_device(dq), be.to_device(dk), be.to_device(dv)
