"""``--check``: sampled query rows against a direct float64 computation, at any N.

For S sampled global positions, every rank computes, in float64 and with plain dense NumPy, the
partial softmax statistics (max, sum, weighted values) of those queries against the keys it
holds; rank 0 merges them and compares with the rows the ring produced. Cost O(S·N·d) in total,
O(S·N/P) memory per rank, so it works at a million tokens.
"""
from __future__ import annotations

import numpy as np

from .layouts import owner, positions

KEY_CHUNK = 8192


def _partials(qs, s_pos, k, v, k_pos, causal, scale):
    """float64 (max, sum, acc) of queries ``qs`` (b, S, H, d) against keys k/v (b, n, Hkv, d)."""
    b, S, h, d = qs.shape
    hkv = k.shape[2]
    g = h // hkv
    q5 = qs.reshape(b, S, hkv, g, d)
    m = np.full((b, hkv, g, S), -np.inf)
    l = np.zeros((b, hkv, g, S))
    acc = np.zeros((b, hkv, g, S, d))
    for c in range(0, k.shape[1], KEY_CHUNK):
        kc = k[:, c:c + KEY_CHUNK].astype(np.float64)
        vc = v[:, c:c + KEY_CHUNK].astype(np.float64)
        s = np.einsum("bsxgd,bkxd->bxgsk", q5, kc) * scale
        if causal:
            s[..., ~(s_pos[:, None] >= k_pos[None, c:c + KEY_CHUNK])] = -np.inf
        m_new = np.maximum(m, s.max(axis=-1))
        safe = np.where(np.isfinite(m_new), m_new, 0.0)
        p = np.exp(s - safe[..., None])
        alpha = np.exp(m - safe)
        l = l * alpha + p.sum(axis=-1)
        acc = acc * alpha[..., None] + np.einsum("bxgsk,bkxd->bxgsd", p, vc)
        m = m_new
    return m, l, acc


def sampled_check(q, k, v, out, lse, comm, *, n, layout, causal, scale=None, rows=64, seed=0):
    """Max abs error of ``out`` and ``lse`` on ``rows`` sampled positions (same dict on every rank)."""
    size, rank = comm.size, comm.rank
    b, _, h, d = q.shape
    scale = 1.0 / np.sqrt(d) if scale is None else float(scale)
    sample = np.sort(np.random.default_rng([seed, 4242]).choice(n, size=min(rows, n), replace=False))
    own, local = owner(n, size, layout, sample)
    mine = own == rank
    li = local[mine]
    pieces = comm.allgather((np.nonzero(mine)[0], q[:, li].astype(np.float64),
                             out[:, li].astype(np.float64), lse[:, :, li].astype(np.float64)))
    S = len(sample)
    qs = np.empty((b, S, h, d))
    os_ = np.empty((b, S, h, d))
    ls = np.empty((b, h, S))
    for idx, qp, op, lp in pieces:
        qs[:, idx], os_[:, idx], ls[:, :, idx] = qp, op, lp
    m, l, acc = _partials(qs, sample, k, v, positions(n, size, rank, layout), causal, scale)
    gathered = comm.gather((m, l, acc), root=0)
    result = None
    if rank == 0:
        M = np.max([p[0] for p in gathered], axis=0)
        safe = np.where(np.isfinite(M), M, 0.0)
        L = sum(p[1] * np.exp(p[0] - safe) for p in gathered)
        A = sum(p[2] * np.exp(p[0] - safe)[..., None] for p in gathered)
        ref = (A / L[..., None]).transpose(0, 3, 1, 2, 4).reshape(b, S, h, d)
        ref_lse = (np.log(L) + safe).reshape(b, h, S)
        result = {"rows": S, "max_abs_err": float(np.abs(os_ - ref).max()),
                  "max_lse_err": float(np.abs(ls - ref_lse).max()),
                  "max_rel_err": float(np.abs(os_ - ref).max() / max(np.abs(ref).max(), 1e-300))}
    return comm.bcast(result, root=0)
