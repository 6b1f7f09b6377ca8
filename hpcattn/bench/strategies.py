"""The ``strategies`` part of ``hpcattn bench``: every context-parallel strategy (the ring,
Ulysses, each proper hybrid grid) on the same shards under one mpiexec, with wall and compute
time (slowest rank), the bytes each rank handed to MPI for other ranks (counted by
``hpcattn.traffic.CountingComm``) beside the model's prediction, and the largest difference of
each strategy's output from the ring's."""
from __future__ import annotations

import time

from .config import BenchConfig


def grids(size: int) -> list[tuple[str, int | None]]:
    """(strategy, ulysses_size): the ring, Ulysses, and hybrid with every U strictly between."""
    return [("ring", None), ("ulysses", None)] + \
        [("hybrid", u) for u in range(2, size) if size % u == 0]


def _ring_bytes(counts, rank: int, per_row: int) -> int:
    """A ring of len(counts) ranks forwards every block but the last it holds: steps 0..P-2."""
    size = len(counts)
    return sum(counts[(rank - step) % size] for step in range(size - 1)) * per_row


def _a2a_bytes(counts, me: int, plan, batch: int, head_dim: int, item: int, lse_item: int) -> int:
    """Ulysses' two all-to-alls: this rank's rows of every other rank's heads out (q, k, v), the
    other ranks' rows of this rank's heads back (out, lse)."""
    out_q = sum(len(p[0]) + 2 * len(p[1]) for j, p in enumerate(plan) if j != me)
    heads_in = len(plan[me][0])
    rows_back = sum(c for j, c in enumerate(counts) if j != me)
    return (counts[me] * batch * head_dim * item * out_q
            + rows_back * batch * heads_in * (head_dim * item + lse_item))


def predicted_bytes(strategy: str, u: int | None, dist, rank: int, *, batch: int, heads: int,
                    kv_heads: int, head_dim: int, item: int, lse_item: int) -> int:
    """Bytes rank ``rank`` sends to other ranks in one forward, by the model: K/V blocks packed
    as the NumPy kernel consumes them (``[k, 1]``, ``[v, 1]``: d+1 values per row and head)."""
    from ..context import GroupDistribution
    from ..ulysses import head_plan

    if strategy == "ring":
        return _ring_bytes(dist.counts, rank, 2 * batch * kv_heads * (head_dim + 1) * item)
    if strategy == "ulysses":
        plan = head_plan(heads, kv_heads, dist.size)
        return _a2a_bytes(dist.counts, rank, plan, batch, head_dim, item, lse_item)
    group, member = divmod(rank, u)
    grid = GroupDistribution(dist, u)
    plan = head_plan(heads, kv_heads, u)
    inner = [dist.count(r) for r in grid.members(group)]
    ring = _ring_bytes(grid.counts, group, 2 * batch * len(plan[member][1]) * (head_dim + 1) * item)
    return ring + _a2a_bytes(inner, member, plan, batch, head_dim, item, lse_item)


def strategies_part(cfg: BenchConfig, comm) -> dict:
    """Every strategy of ``grids(comm.size)`` on this job's ranks; rank 0's dict has them all."""
    import numpy as np

    from .. import exchange
    from ..context import context_attention
    from ..inputs import random_qkv
    from ..layouts import Distribution
    from ..traffic import CountingComm

    size, rank = comm.size, comm.rank
    dist = Distribution(cfg.seq_len, size, cfg.layout)
    kv_heads = cfg.heads
    q, k, v = random_qkv(0, dist.positions(rank), cfg.batch, cfg.heads, kv_heads, cfg.head_dim,
                         cfg.dtype)
    counting = CountingComm(comm)
    item = np.dtype(cfg.dtype).itemsize
    lse_item = 8 if cfg.dtype == "float64" else 4
    rows, ring_out = [], None
    for strategy, u in grids(size):
        kw = dict(strategy=strategy, ulysses_size=u, causal=cfg.causal, layout=cfg.layout)
        context_attention(q, k, v, comm, **kw)  # warm-up: allocations, first-touch, MPI set-up
        walls, computes, sent = [], [], 0
        for _ in range(cfg.repeats):
            exchange.barrier(comm, "starting a strategy repeat")
            counting.reset()
            stats: dict = {}
            t0 = time.perf_counter()
            out, _ = context_attention(q, k, v, counting, stats=stats, **kw)
            wall = time.perf_counter() - t0
            sent = counting.sent
            walls.append(exchange.allreduce(comm, wall, "timing a strategy", op=_max()))
            computes.append(exchange.allreduce(comm, float(stats.get("compute_s", 0.0)),
                                               "timing a strategy", op=_max()))
        if ring_out is None:
            ring_out = out
        diff = float(np.abs(out.astype(np.float64) - ring_out).max()) if out.size else 0.0
        measured = exchange.allgather(comm, sent, "counting a strategy's bytes")
        predicted = [predicted_bytes(strategy, u, dist, r, batch=cfg.batch, heads=cfg.heads,
                                     kv_heads=kv_heads, head_dim=cfg.head_dim, item=item,
                                     lse_item=lse_item) for r in range(size)]
        best = int(np.argmin(walls))
        rows.append({"strategy": strategy, "ulysses_size": u, "wall_s": walls[best],
                     "wall_s_all": walls, "compute_s": computes[best],
                     "bytes_sent": measured, "bytes_predicted": predicted,
                     "max_diff_from_ring": exchange.allreduce(comm, diff, "comparing strategies",
                                                              op=_max())})
    return {"ranks": size, "seq_len": cfg.seq_len, "layout": cfg.layout, "strategies": rows}


def _max():
    from mpi4py import MPI

    return MPI.MAX


def strategies_table(cfg: BenchConfig, res: dict) -> str:
    """The per-strategy table: slowest rank's wall and compute, bytes per rank measured vs model."""
    from .report import _shape

    mib = 2.0 ** 20
    lines = [f"\ncontext-parallel strategies ({_shape(cfg)}; P={res['ranks']} ranks, layout "
             f"{res['layout']}; best of {cfg.repeats}, slowest rank)",
             f"  {'strategy':<22s}{'wall s':>9s}{'compute s':>11s}{'wall/compute':>14s}"
             f"{'MiB sent/rank (max) measured':>30s}{'predicted':>11s}{'max |out-ring|':>16s}"]
    for row in res["strategies"]:
        name = row["strategy"] + (f" U={row['ulysses_size']}" if row["ulysses_size"] else "")
        ratio = row["wall_s"] / row["compute_s"] if row["compute_s"] > 0 else float("nan")
        lines.append(f"  {name:<22s}{row['wall_s']:9.3f}{row['compute_s']:11.3f}{ratio:14.2f}"
                     f"{max(row['bytes_sent']) / mib:30.2f}{max(row['bytes_predicted']) / mib:11.2f}"
                     f"{row['max_diff_from_ring']:16.1e}")
    lines.append("  compute: time in the per-rank kernels (Ulysses: one call over the whole "
                 "sequence); wall - compute: exchange not hidden behind compute; bytes: what a "
                 "rank hands MPI for other ranks in one forward")
    return "\n".join(lines)
