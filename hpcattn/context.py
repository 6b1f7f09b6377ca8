"""Context parallelism by strategy: the ring, Ulysses, or a 2-D hybrid of both (USP-style).

``context_attention(q, k, v, comm, strategy=...)`` takes the same sequence shards as
``ring_attention`` and returns the same rows; only how the work and data move differs:

* ``"ring"``: K/V blocks travel around all P ranks (``hpcattn.ring``); no head-count limit.
* ``"ulysses"``: all-to-all over heads (``hpcattn.ulysses``); two collectives, any head count.
* ``"hybrid"``: the ranks form a grid of P/U groups of U consecutive ranks. Inside a group
  (on a cluster: inside a node) an all-to-all gives each member the group's rows for 1/U of the
  heads; across groups the members that hold the same heads run a ring over the groups' rows;
  a last all-to-all returns every rank its own rows. ``ulysses_size=U`` must divide P.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import backend
from .errors import CollectiveError
from .ring import check_ring_inputs, ring_attention, ring_over
from .ulysses import _Relayout, head_plan, over_heads, ulysses_attention

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


def hybrid_attention(q, k, v, comm=None, *, ulysses_size: int, causal: bool = False,
                     layout: str = "contiguous", scale: float | None = None,
                     stats: dict | None = None, **block_kw):
    """The 2-D strategy (see the module docstring); same contract as ``ring_attention``."""
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    be = backend.select(q)
    dist = check_ring_inputs(q, k, v, comm, layout, be)
    u = check_grid(comm.size, ulysses_size)
    group, member = divmod(comm.rank, u)
    inner = comm.Split(group, comm.rank)     # the u ranks of my group: all-to-all
    across = comm.Split(member, comm.rank)   # the ranks holding the same heads: ring
    try:
        grid = GroupDistribution(dist, u)
        move = _Relayout(inner, [dist.count(r) for r in grid.members(group)],
                         head_plan(q.shape[2], k.shape[2], u), be)
        ring_stats: dict = {}

        def attend(qg, kg, vg):
            return ring_over(be.to_device(qg), be.to_device(kg), be.to_device(vg), across, grid, be,
                             causal=causal, scale=scale, stats=ring_stats, **block_kw)

        t0 = time.perf_counter()
        out, lse, sent = over_heads(q, k, v, move, attend)
        if stats is not None:
            stats.update(wall_s=time.perf_counter() - t0, compute_s=ring_stats.get("compute_s", 0.0),
                         wait_s=ring_stats.get("wait_s", 0.0), a2a_bytes_sent=sent,
                         steps=ring_stats.get("steps", 0), skipped=ring_stats.get("skipped", 0))
        return out, lse
    finally:
        inner.Free()
        across.Free()


def context_attention(q, k, v, comm=None, *, strategy: str = "ring", ulysses_size: int | None = None,
                      causal: bool = False, layout: str = "contiguous", scale: float | None = None,
                      stats: dict | None = None, **block_kw):
    """Exact attention over the sequence whose shards the ranks of ``comm`` hold, by
    ``strategy`` ("ring", "ulysses" or "hybrid" with ``ulysses_size``); this rank's ``(out, lse)``."""
    kw = dict(causal=causal, layout=layout, scale=scale, stats=stats, **block_kw)
    if strategy == "ring":
        return ring_attention(q, k, v, comm, **kw)
    if strategy == "ulysses":
        return ulysses_attention(q, k, v, comm, **kw)
    if strategy == "hybrid":
        return hybrid_attention(q, k, v, comm, ulysses_size=ulysses_size, **kw)
    raise ValueError(f"strategy {strategy!r} is unknown; expected one of {', '.join(STRATEGIES)}")
