"""Exact ring attention across MPI ranks.

Every rank holds the queries, keys and values of its positions (see ``hpcattn.layouts``). For P
steps it computes blockwise attention of its queries against the K/V block it currently holds
while that block is already travelling to rank r+1 and the next one arrives from rank r-1
(non-blocking MPI, two buffers). The backend (``hpcattn.backend``, chosen once from q) supplies
the running state every arriving block is folded into, the exchange and the step clock: on CPU
one online-softmax state (``blockwise.PartialAttention``), on GPU per-block kernel results merged
by their log-sum-exp (``gpu.MergedAttention``).

Causal attention uses global positions, so the same loop serves every layout; a block whose keys
all lie in the future of every local query is skipped (never computed), and with ``zigzag`` or
``striped`` every rank does about the same work.
"""
from __future__ import annotations

from . import backend, exchange
from .errors import CollectiveError, HpcattnError
from .layouts import Distribution, check_layout
from .validate import check_qkv


def _describe(q, k, v, be):
    """What every rank tells the others before the ring starts (and its local error, if any)."""
    try:
        check_qkv(q, k, v, allowed=be.dtypes, xp=be.xp)
        err = None
    except HpcattnError as exc:
        err = str(exc)
    return {"err": err, "q": tuple(getattr(q, "shape", ())), "kv": tuple(getattr(k, "shape", ())),
            "dtype": str(getattr(q, "dtype", "?"))}


def check_ring_inputs(q, k, v, comm, layout: str, be=None) -> Distribution:
    """Collective validation: raises the same CollectiveError on every rank, or returns how the
    sequence is distributed. ``be``: q's backend (default ``backend.select(q)``)."""
    check_layout(layout)
    size = comm.size
    be = backend.select(q) if be is None else be
    infos = exchange.allgather(comm, _describe(q, k, v, be), "checking the ring's inputs")
    for r, info in enumerate(infos):
        if info["err"]:
            raise CollectiveError(f"rank {r}: {info['err']}")
    ref = infos[0]
    for r, info in enumerate(infos):
        if info["q"][0] != ref["q"][0] or info["q"][2:] != ref["q"][2:] or info["kv"][2:] != ref["kv"][2:] \
                or info["dtype"] != ref["dtype"]:
            raise CollectiveError(
                f"rank {r} has q {info['q']}, k/v {info['kv']}, {info['dtype']} but rank 0 has q {ref['q']}, "
                f"k/v {ref['kv']}, {ref['dtype']}; expected equal batch, heads, head_dim and dtype on every rank")
        if info["q"][1] != info["kv"][1]:
            raise CollectiveError(f"rank {r} holds {info['q'][1]} query rows but {info['kv'][1]} key rows; "
                                  "expected q, k and v sharded alike")
    counts = [info["q"][1] for info in infos]
    n = sum(counts)
    if n < size:
        raise CollectiveError(f"sequence length N={n} is smaller than the number of ranks P={size}; "
                              "expected N >= P")
    dist = Distribution(n, size, layout)
    if (problem := dist.mismatch(counts)) is not None:
        raise CollectiveError(f"{problem}; shard inputs with hpcattn.shard")
    return dist


def ring_attention(q, k, v, comm=None, *, causal: bool = False, layout: str = "contiguous",
                   scale: float | None = None, stats: dict | None = None, **block_kw):
    """Exact attention over the global sequence whose shards the ranks of ``comm`` hold.

    ``q``, ``k``, ``v`` are this rank's shards, (batch, n_local, heads, head_dim), laid out by
    ``layout`` (use ``hpcattn.shard``). Returns this rank's ``(out, lse)`` rows, identical (to
    rounding) to single-rank ``attention`` on the global arrays. If ``stats`` is a dict it receives
    ``compute_s`` (time in attention), ``wait_s`` (time blocked in the exchange), ``steps``
    and ``skipped`` (blocks skipped by the causal mask).
    """
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    be = backend.select(q)
    dist = check_ring_inputs(q, k, v, comm, layout, be)
    return ring_over(q, k, v, comm, dist, be, causal=causal, scale=scale, stats=stats, **block_kw)


def ring_over(q, k, v, comm, dist, be, *, causal: bool, scale, stats=None, **block_kw):
    """The ring loop on validated shards. ``dist`` says which rows rank r of ``comm`` holds:
    ``counts``, ``count(r)``, ``positions(r)`` (a ``layouts.Distribution``, or any value with
    those, e.g. the groups of ranks of the hybrid strategy; positions need not be sorted)."""
    size, rank = comm.size, comm.rank
    t_compute = t_wait = 0.0
    skipped = 0
    clock = be.clock()
    if size == 1:
        pos = dist.positions(0) if causal else None
        clock.start()
        out, lse = be.attention(q, k, v, causal=causal, scale=scale, q_pos=pos, k_pos=pos, **block_kw)
        clock.computed()
        t_compute, _ = clock.stop()
    else:
        ring = be.ring_comm(comm)
        q_pos = dist.positions(rank)
        q_last = int(q_pos.max()) if len(q_pos) else -1
        # the blocks travel in the form the per-rank kernel consumes (for NumPy: [k, 1], [v, 1]
        # per head), and every block is folded into one running state: no per-step output
        part = be.partial(q, k.shape[2], causal=causal, scale=scale, q_pos=q_pos, **block_kw)
        bufs = [be.xp.empty(part.packed_size(max(dist.counts)), dtype=k.dtype) for _ in range(2)]
        part.pack(k, v, bufs[0])
        computed = 0
        for step in range(size):
            src = (rank - step) % size          # whose block we hold now
            cur, nxt = bufs[step % 2], bufs[(step + 1) % 2]
            n_src = dist.count(src)
            if step < size - 1:
                n_next = dist.count((src - 1) % size)
                ring.send_recv(cur[: part.packed_size(n_src)], nxt[: part.packed_size(n_next)], step=step)
            k_pos = dist.positions(src)
            clock.start()
            if causal and q_last < int(k_pos.min()):
                skipped += 1                     # every key is in every query's future
            else:
                part.add_packed(cur[: part.packed_size(n_src)], n_src, k_pos, progress=ring.progress)
                computed += 1
            clock.computed()
            ring.wait()
            busy, idle = clock.stop()
            t_compute += busy
            t_wait += idle
        if not computed:  # cannot happen for causal (a query always sees itself), kept for safety
            raise HpcattnError("no key block was visible to this rank's queries")
        clock.start()
        out, lse = part.result()
        clock.computed()
        t_compute += clock.stop()[0]
    if stats is not None:
        stats.update(compute_s=t_compute, wait_s=t_wait, steps=size, skipped=skipped)
    return out, lse
