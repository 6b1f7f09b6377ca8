"""``--check``: sampled rows against a direct float64 computation, at any N.

Forward (``sampled_check``): for S sampled global positions, every rank computes the float64
reference attention (``reference.naive_attention``) of those queries against the keys it holds,
a chunk of keys at a time, and merges the chunks by log-sum-exp; rank 0 merges the ranks' results
the same way and compares with the rows the ring produced. Cost O(S·N·d) in total, O(S·KEY_CHUNK)
scores per rank at a time, so it works at a million tokens.

Backward (``sampled_backward_check``): the gradients are sums over one index of the probability
matrix, so sampled rows of them cost O(S·N·d) too. For S sampled query rows,
``dq_i = scale·Σ_j P_ij (dP_ij - D_i) k_j`` with ``P_ij = exp(s_ij - lse_i)``, ``dP_ij = dout_i·v_j``
and ``D_i = dout_i·out_i``, where lse_i and out_i are recomputed in float64 (as the forward check
does) and every rank sums its keys' share. For S sampled KEY rows, ``dv_j = Σ_i P_ij dout_i`` and
``dk_j = scale·Σ_i P_ij (dP_ij - D_i) q_i`` need P over every query: each rank sums its own queries'
share with the forward's lse and out (the forward check verifies those on its sampled rows; the
float64 lse of every query would cost O(N²)). Rank 0 adds the shares and compares.

Masks (``window``, ``cu_seqlens``, ``align`` beside ``causal``) are applied by the reference's
own definition (``reference.visible_matrix`` on global positions), never by the kernels' tile
classifier, so the check is independent of what it checks.
"""
from __future__ import annotations

import numpy as np

from . import exchange
from .layouts import Distribution
from .merge import merge_lse
from .reference import naive_attention, visible_matrix

KEY_CHUNK = 8192


def _spec(causal, window, cu_seqlens, align, n):
    """The reference's mask arguments for a length-``n`` self-attention."""
    return dict(causal=causal, window=window, cu_seqlens=cu_seqlens, align=align, n_q=n, n_k=n)


def _reference_rows(qs, s_pos, k, v, k_pos, spec, scale):
    """float64 (out, lse) of queries ``qs`` (b, S, H, d) at ``s_pos`` over keys k/v at ``k_pos``."""
    b, S, h, d = qs.shape
    out, lse = np.zeros((b, S, h, d)), np.full((b, h, S), -np.inf)
    for c in range(0, k.shape[1], KEY_CHUNK):
        o, l = naive_attention(qs, k[:, c:c + KEY_CHUNK], v[:, c:c + KEY_CHUNK], scale=scale,
                               q_pos=s_pos, k_pos=k_pos[c:c + KEY_CHUNK], **spec)
        merge_lse(out, lse, o, l, np)
    return out, lse


def sampled_check(q, k, v, out, lse, comm, *, dist: Distribution, causal, scale=None, rows=64,
                  seed=0, window=None, cu_seqlens=None, align="top-left"):
    """Max abs error of ``out`` and ``lse`` on ``rows`` sampled positions (same dict on every
    rank); q, k, v, out, lse are this rank's host arrays, distributed as ``dist``; the mask as
    ``hpcattn.ring_attention`` takes it."""
    rank, n = comm.rank, dist.n
    b, _, h, d = q.shape
    sample = np.sort(np.random.default_rng([seed, 4242]).choice(n, size=min(rows, n), replace=False))
    own, local = dist.owner(sample)
    mine = own == rank
    li = local[mine]
    pieces = exchange.allgather(comm, (np.nonzero(mine)[0], q[:, li].astype(np.float64),
                                       out[:, li].astype(np.float64), lse[:, :, li].astype(np.float64)),
                                "the check's sampled rows")
    S = len(sample)
    qs = np.empty((b, S, h, d))
    os_ = np.empty((b, S, h, d))
    ls = np.empty((b, h, S))
    for idx, qp, op, lp in pieces:
        qs[:, idx], os_[:, idx], ls[:, :, idx] = qp, op, lp
    spec = _spec(causal, window, cu_seqlens, align, n)
    partial = _reference_rows(qs, sample, k, v, dist.positions(rank), spec, scale)
    gathered = exchange.gather(comm, partial, "the check's partial sums")
    result = None
    if rank == 0:
        ref, ref_lse = gathered[0]
        for o, l in gathered[1:]:
            merge_lse(ref, ref_lse, o, l, np)
        result = {"rows": S, "max_abs_err": float(np.abs(os_ - ref).max()),
                  "max_lse_err": float(np.abs(ls - ref_lse).max()),
                  "max_rel_err": float(np.abs(os_ - ref).max() / max(np.abs(ref).max(), 1e-300))}
    return exchange.bcast(comm, result, "the check's result")


def _grouped(x, hkv):
    """(b, n, h, c) -> (b, hkv, g, n, c) float64: the g query heads of a kv head together."""
    b, n, h, c = x.shape
    return np.asarray(x, dtype=np.float64).transpose(0, 2, 1, 3).reshape(b, hkv, h // hkv, n, c)


def _probs_and_dscores(qh, doh, lse, delta, kh, vh, q_pos, k_pos, spec):
    """float64 P and dS (b, hkv, g, n_q, n_k) of grouped, pre-scaled queries ``qh`` against keys
    kh/vh (b, hkv, 1, n_k, d); ``lse``/``delta`` (b, hkv, g, n_q). Rows with lse = -inf (no
    visible key) get P = 0."""
    s = np.matmul(qh, kh.swapaxes(-1, -2))
    seen = np.isfinite(lse)
    s -= np.where(seen, lse, 0.0)[..., None]
    p = np.exp(s, out=s)
    hidden = ~seen[..., None] | ~visible_matrix(q_pos, k_pos, **spec)
    np.copyto(p, 0.0, where=hidden)
    ds = np.matmul(doh, vh.swapaxes(-1, -2))
    ds -= delta[..., None]
    ds *= p
    return p, ds


def _rows(x, li):
    """This rank's sampled rows of ``x`` (local indices ``li``) as float64."""
    return np.asarray(np.take(x, li, axis=1), dtype=np.float64)


def _sampled_rows(arrays, comm, dist, rows, seed, stream):
    """Sorted sampled global positions and, for each of ``arrays`` (this rank's shards), the
    sampled rows in sample order as float64, on every rank."""
    n = dist.n
    sample = np.sort(np.random.default_rng([seed, stream]).choice(n, size=min(rows, n), replace=False))
    own, local = dist.owner(sample)
    mine = own == comm.rank
    li = local[mine]
    pieces = exchange.allgather(comm, (np.nonzero(mine)[0], *(_rows(x, li) for x in arrays)),
                                "sampling rows for the gradient check")
    full = [np.empty((x.shape[0], len(sample), *x.shape[2:])) for x in arrays]
    for idx, *parts in pieces:
        for f, part in zip(full, parts):
            f[:, idx] = part
    return sample, full


def _errors(name, got, ref) -> dict:
    err = float(np.abs(got - ref).max(initial=0.0))
    return {f"max_{name}_err": err,
            f"max_{name}_rel_err": err / max(float(np.abs(ref).max(initial=0.0)), 1e-300)}


def _query_rows(q, k, v, dout, dq, comm, dist, spec, scale, rows, seed):
    """Rank 0: (the ring's dq, float64 dq) on sampled query rows; None elsewhere."""
    rank = comm.rank
    b, n_local, h, d = q.shape
    hkv = k.shape[2]
    pos = dist.positions(rank)
    sample, (qs, dos, dq_s) = _sampled_rows((q, dout, dq), comm, dist, rows, seed, 4242)
    S = len(sample)
    # lse and out of the sampled rows in float64, as the forward check computes them
    parts = exchange.gather(comm, _reference_rows(qs, sample, k, v, pos, spec, scale),
                            "the gradient check's reference rows")
    if rank == 0:
        for o, l in parts[1:]:
            merge_lse(*parts[0], o, l, np)
        parts = parts[0]
    ref_out, ref_lse = exchange.bcast(comm, parts, "the gradient check's reference rows")
    qh, doh = _grouped(qs, hkv) * scale, _grouped(dos, hkv)
    lse_s = ref_lse.reshape(b, hkv, h // hkv, S)
    delta = np.einsum("bkgnd,bkgnd->bkgn", doh, _grouped(ref_out, hkv))
    kh, vh = _grouped(k, hkv), _grouped(v, hkv)
    share = np.zeros((b, hkv, h // hkv, S, d))
    for c in range(0, n_local, KEY_CHUNK):
        sl = slice(c, c + KEY_CHUNK)
        _, ds = _probs_and_dscores(qh, doh, lse_s, delta, kh[..., sl, :], vh[..., sl, :], sample,
                                   pos[sl], spec)
        share += np.matmul(ds, kh[..., sl, :])
    shares = exchange.gather(comm, share, "the gradient check's dq rows")
    if rank != 0:
        return None
    ref = (scale * sum(shares)).reshape(b, h, S, d).transpose(0, 2, 1, 3)
    return dq_s, ref


def _key_rows(q, k, v, out, lse, dout, dk, dv, comm, dist, spec, scale, rows, seed):
    """Rank 0: (the ring's dk, dv, float64 dk, dv) on sampled key rows; None elsewhere."""
    b, n_local, h, d = q.shape
    hkv = k.shape[2]
    pos = dist.positions(comm.rank)
    sample, (ks, vs, dks, dvs) = _sampled_rows((k, v, dk, dv), comm, dist, rows, seed, 4243)
    S = len(sample)
    ksh, vsh = _grouped(ks, hkv), _grouped(vs, hkv)
    dk_share, dv_share = np.zeros((b, hkv, S, d)), np.zeros((b, hkv, S, d))
    for c in range(0, n_local, KEY_CHUNK):   # this rank's queries, a chunk at a time
        sl = slice(c, c + KEY_CHUNK)
        qh, doh = _grouped(q[:, sl], hkv) * scale, _grouped(dout[:, sl], hkv)
        lse_l = np.asarray(lse[:, :, sl], dtype=np.float64).reshape(b, hkv, h // hkv, -1)
        delta = np.einsum("bkgnd,bkgnd->bkgn", doh, _grouped(out[:, sl], hkv))
        p, ds = _probs_and_dscores(qh, doh, lse_l, delta, ksh, vsh, pos[sl], sample, spec)
        dv_share += np.matmul(p.swapaxes(-1, -2), doh).sum(axis=2)
        dk_share += np.matmul(ds.swapaxes(-1, -2), qh).sum(axis=2)
    shares = exchange.gather(comm, (dk_share, dv_share), "the gradient check's dk/dv rows")
    if comm.rank != 0:
        return None
    ref_dk, ref_dv = (sum(s[j] for s in shares).transpose(0, 2, 1, 3) for j in (0, 1))
    return dks, dvs, ref_dk, ref_dv


def sampled_backward_check(q, k, v, out, lse, dout, dq, dk, dv, comm, *, dist: Distribution, causal,
                           scale=None, rows=64, seed=0, window=None, cu_seqlens=None,
                           align="top-left"):
    """Max abs (and relative) errors of the ring's ``dq`` on ``rows`` sampled query rows and of
    its ``dk``/``dv`` on ``rows`` sampled key rows, against float64 (the same dict on every rank:
    ``rows``, ``max_dq_err``, ``max_dk_err``, ``max_dv_err`` and ``max_*_rel_err``).

    Collective. Every argument is this rank's host array, distributed as ``dist``: the forward's
    inputs ``q``, ``k``, ``v`` and outputs ``out``, ``lse``, the output gradient ``dout`` and the
    gradients the ring produced. The query rows are the forward check's (same ``seed``); the
    mask as for :func:`sampled_check`.
    """
    scale = 1.0 / np.sqrt(q.shape[3]) if scale is None else float(scale)
    spec = _spec(causal, window, cu_seqlens, align, dist.n)
    queries = _query_rows(q, k, v, dout, dq, comm, dist, spec, scale, rows, seed)
    keys = _key_rows(q, k, v, out, lse, dout, dk, dv, comm, dist, spec, scale, rows, seed)
    result = None
    if comm.rank == 0:
        dks, dvs, ref_dk, ref_dv = keys
        result = {"rows": min(rows, dist.n), **_errors("dq", *queries), **_errors("dk", dks, ref_dk),
                  **_errors("dv", dvs, ref_dv)}
    return exchange.bcast(comm, result, "the gradient check's result")
