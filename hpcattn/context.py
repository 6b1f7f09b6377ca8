"""Context parallelism by strategy: the ring, Ulysses, or a 2-D hybrid of both (USP-style).

``context_attention(q, k, v, comm, strategy=...)`` takes the same sequence shards as
``ring_attention`` and returns the same rows; only how the work and data move differs:

* ``"ring"``: K/V blocks travel around all P ranks (``hpcattn.ring``); no head-count limit.
* ``"ulysses"``: all-to-all over heads (``hpcattn.ulysses``); two collectives, any head count.
* ``"hybrid"``: the ranks form a grid of P/U groups of U consecutive ranks. Inside a group
  (on a cluster: inside a node) an all-to-all gives each member the group's rows for 1/U of the
  heads; across groups the members that hold the same heads run a ring over the groups' rows;
  a last all-to-all returns every rank its own rows. ``ulysses_size=U`` must divide P.

``context_attention_backward`` is the gradient of each strategy: the ring's backward ring, the
Ulysses all-to-alls around the per-rank backward, and for the hybrid grid the group all-to-alls
around a backward ring across groups (kv heads replicated inside a group get their copies'
gradients summed on the way back).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import backend
from .errors import CollectiveError, HpcattnError
from .ring import check_context_inputs, mask_spec, ring_attention, ring_over
from .ring_backward import check_backward_context, ring_attention_backward, ring_backward_over
from .ulysses import _Relayout, head_plan, over_heads, ulysses_attention, ulysses_attention_backward

STRATEGIES = ("ring", "ulysses", "hybrid")


@dataclass(frozen=True)
class GroupDistribution:
    """The rows of groups of ``u`` consecutive ranks of ``dist``: what the ring across groups
    sees (ring rank g holds the positions of ranks g*u .. g*u+u-1, in that order)."""

    dist: object
    u: int

    @property
    def size(self) -> int:
        return self.dist.size // self.u

    @property
    def n(self) -> int:
        return self.dist.n

    @property
    def counts(self) -> tuple:
        return tuple(self.count(g) for g in range(self.size))

    def members(self, group: int) -> range:
        return range(group * self.u, (group + 1) * self.u)

    def count(self, group: int) -> int:
        return sum(self.dist.count(r) for r in self.members(group))

    def positions(self, group: int) -> np.ndarray:
        return np.concatenate([self.dist.positions(r) for r in self.members(group)])


def check_grid(size: int, ulysses_size) -> int:
    """``ulysses_size`` as an int that divides ``size`` (the same error on every rank)."""
    if isinstance(ulysses_size, bool) or not isinstance(ulysses_size, (int, np.integer)) \
            or ulysses_size < 1 or size % ulysses_size:
        raise CollectiveError(f"ulysses_size={ulysses_size!r} on P={size} ranks; expected a "
                              f"positive divisor of {size}")
    return int(ulysses_size)


class _Grid:
    """The two sub-communicators of a hybrid grid (freed on exit) and the group's re-layout."""

    def __init__(self, comm, dist, ulysses_size, heads, kv_heads, be):
        u = check_grid(comm.size, ulysses_size)
        plan = head_plan(heads, kv_heads, u)
        group, member = divmod(comm.rank, u)
        self.inner = comm.Split(group, comm.rank)    # the u ranks of my group: all-to-all
        self.across = comm.Split(member, comm.rank)  # the ranks holding the same heads: ring
        self.dist = GroupDistribution(dist, u)
        self.move = _Relayout(self.inner, [dist.count(r) for r in self.dist.members(group)], plan, be)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.inner.Free()
        self.across.Free()


def _self_attention_only(dist, dist_k):
    """The grid re-lays queries and keys with one plan: no cross-attention (same on every rank)."""
    if dist_k is not dist:
        raise CollectiveError(f"seqlen_q={dist.n} != seqlen_k={dist_k.n} with strategy 'hybrid'; "
                              "expected self-attention, or strategy ring or ulysses for "
                              "cross-attention")


def hybrid_attention(q, k, v, comm=None, *, ulysses_size: int, causal: bool = False,
                     layout: str = "contiguous", scale: float | None = None,
                     stats: dict | None = None, window=None, cu_seqlens=None,
                     align: str = "top-left", kv_pieces: int = 1, **block_kw):
    """The 2-D strategy (see the module docstring); same contract as ``ring_attention`` (masks
    included: the ring across groups applies them by global positions; ``kv_pieces`` for the
    ring across groups)."""
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    be = backend.select(q)
    dist, mask, dist_k = check_context_inputs(q, k, v, comm, layout, be,
                                              mask_spec(causal, window, cu_seqlens, align),
                                              kv_pieces)
    _self_attention_only(dist, dist_k)
    with _Grid(comm, dist, ulysses_size, q.shape[2], k.shape[2], be) as grid:
        ring_stats: dict = {}

        def attend(qg, kg, vg):
            return ring_over(be.to_device(qg), be.to_device(kg), be.to_device(vg), grid.across,
                             grid.dist, be, causal=causal, scale=scale, stats=ring_stats, mask=mask,
                             kv_pieces=kv_pieces, **block_kw)

        t0 = time.perf_counter()
        out, lse, sent = over_heads(q, k, v, grid.move, attend)
        if stats is not None:
            stats.update(wall_s=time.perf_counter() - t0, compute_s=ring_stats.get("compute_s", 0.0),
                         wait_s=ring_stats.get("wait_s", 0.0), a2a_bytes_sent=sent,
                         steps=ring_stats.get("steps", 0), skipped=ring_stats.get("skipped", 0))
        return out, lse


def hybrid_attention_backward(q, k, v, out, lse, dout, comm=None, *, ulysses_size: int,
                              causal: bool = False, layout: str = "contiguous",
                              scale: float | None = None, stats: dict | None = None, window=None,
                              cu_seqlens=None, align: str = "top-left", kv_pieces: int = 1,
                              **block_kw):
    """``(dq, dk, dv)`` of this rank's shard for the 2-D strategy: the group's all-to-all gives
    every member the group's rows of q, k, v, out, dout and lse for its heads, a backward ring
    across the groups differentiates them, and the gradients go back to the rows' owners. Same
    contract as ``hpcattn.ring_attention_backward``."""
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    be = backend.select(q)
    dist, mask, dist_k = check_backward_context(q, k, v, out, lse, dout, comm, layout, be,
                                                mask_spec(causal, window, cu_seqlens, align),
                                                kv_pieces)
    _self_attention_only(dist, dist_k)
    h, hkv = q.shape[2], k.shape[2]
    with _Grid(comm, dist, ulysses_size, h, hkv, be) as grid:
        move = grid.move
        full = [move.to_heads(x, which) for x, which in ((q, 0), (k, 1), (v, 1), (out, 0), (dout, 0))]
        lse_full = move.lse_to_heads(lse)
        ring_stats: dict = {}
        t0 = time.perf_counter()
        # every rank of ``across`` holds the same member index, hence the same heads: all of
        # them run the ring, or none does
        if len(move.mine[0]):
            qg, kg, vg, og, dg = (be.to_device(x) for x in (*full[:4], full[4]))
            grads = [be.to_host(g) for g in ring_backward_over(
                qg, kg, vg, og, be.to_device(lse_full), dg, grid.across, grid.dist, be,
                causal=causal, scale=scale, stats=ring_stats, mask=mask, kv_pieces=kv_pieces,
                **block_kw)]
        else:
            grads = [np.zeros_like(full[0]), np.zeros_like(full[1]), np.zeros_like(full[2])]
        replicated = hkv < move.comm.size
        dq = move.to_rows(grads[0], 0, h)
        dk = move.to_rows(grads[1], 1, hkv, add=replicated)
        dv = move.to_rows(grads[2], 1, hkv, add=replicated)
        if stats is not None:
            stats.update(wall_s=time.perf_counter() - t0, compute_s=ring_stats.get("compute_s", 0.0),
                         wait_s=ring_stats.get("wait_s", 0.0), steps=ring_stats.get("steps", 0),
                         skipped=ring_stats.get("skipped", 0))
        return be.to_device(dq), be.to_device(dk), be.to_device(dv)


def _no_pieces(kw: dict) -> dict:
    """``kw`` without ``kv_pieces``, which Ulysses has no use for: HpcattnError unless it is 1."""
    kw = dict(kw)
    pieces = kw.pop("kv_pieces", 1)
    if pieces != 1:
        raise HpcattnError(f"kv_pieces={pieces!r} is for the ring and hybrid strategies (ulysses "
                           "passes no K/V blocks); expected 1")
    return kw


def context_attention(q, k, v, comm=None, *, strategy: str = "ring", ulysses_size: int | None = None,
                      causal: bool = False, layout: str = "contiguous", scale: float | None = None,
                      stats: dict | None = None, **block_kw):
    """Exact attention over the sequence whose shards the ranks of ``comm`` hold, by
    ``strategy`` ("ring", "ulysses" or "hybrid" with ``ulysses_size``); this rank's ``(out, lse)``."""
    kw = dict(causal=causal, layout=layout, scale=scale, stats=stats, **block_kw)
    if strategy == "ring":
        return ring_attention(q, k, v, comm, **kw)
    if strategy == "ulysses":
        return ulysses_attention(q, k, v, comm, **_no_pieces(kw))
    if strategy == "hybrid":
        return hybrid_attention(q, k, v, comm, ulysses_size=ulysses_size, **kw)
    raise ValueError(f"strategy {strategy!r} is unknown; expected one of {', '.join(STRATEGIES)}")


def context_attention_backward(q, k, v, out, lse, dout, comm=None, *, strategy: str = "ring",
                               ulysses_size: int | None = None, causal: bool = False,
                               layout: str = "contiguous", scale: float | None = None,
                               stats: dict | None = None, **block_kw):
    """``(dq, dk, dv)`` of this rank's shard by ``strategy``, given ``context_attention``'s
    ``(out, lse)`` for it and ``dout = dL/dout``; equal (to rounding) for every strategy."""
    kw = dict(causal=causal, layout=layout, scale=scale, stats=stats, **block_kw)
    if strategy == "ring":
        return ring_attention_backward(q, k, v, out, lse, dout, comm, **kw)
    if strategy == "ulysses":
        return ulysses_attention_backward(q, k, v, out, lse, dout, comm, **_no_pieces(kw))
    if strategy == "hybrid":
        return hybrid_attention_backward(q, k, v, out, lse, dout, comm, ulysses_size=ulysses_size, **kw)
    raise ValueError(f"strategy {strategy!r} is unknown; expected one of {', '.join(STRATEGIES)}")
