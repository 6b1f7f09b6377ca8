"""``--check``: sampled query rows against a direct float64 computation, at any N.

For S sampled global positions, every rank computes the float64 reference attention
(``reference.naive_attention``) of those queries against the keys it holds, a chunk of keys at a
time, and merges the chunks by log-sum-exp; rank 0 merges the ranks' results the same way and
compares with the rows the ring produced. Cost O(S·N·d) in total, O(S·KEY_CHUNK) scores per
rank at a time, so it works at a million tokens.
"""
from __future__ import annotations

import numpy as np

from .layouts import Distribution
from .merge import merge_lse
from .reference import naive_attention

KEY_CHUNK = 8192


def _reference_rows(qs, s_pos, k, v, k_pos, causal, scale):
    """float64 (out, lse) of queries ``qs`` (b, S, H, d) at ``s_pos`` over keys k/v at ``k_pos``."""
    b, S, h, d = qs.shape
    out, lse = np.zeros((b, S, h, d)), np.full((b, h, S), -np.inf)
    for c in range(0, k.shape[1], KEY_CHUNK):
        o, l = naive_attention(qs, k[:, c:c + KEY_CHUNK], v[:, c:c + KEY_CHUNK], causal=causal,
                               scale=scale, q_pos=s_pos, k_pos=k_pos[c:c + KEY_CHUNK])
        merge_lse(out, lse, o, l, np)
    return out, lse


def sampled_check(q, k, v, out, lse, comm, *, dist: Distribution, causal, scale=None, rows=64,
                  seed=0):
    """Max abs error of ``out`` and ``lse`` on ``rows`` sampled positions (same dict on every
    rank); q, k, v, out, lse are this rank's host arrays, distributed as ``dist``."""
    rank, n = comm.rank, dist.n
    b, _, h, d = q.shape
    sample = np.sort(np.random.default_rng([seed, 4242]).choice(n, size=min(rows, n), replace=False))
    own, local = dist.owner(sample)
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
    partial = _reference_rows(qs, sample, k, v, dist.positions(rank), causal, scale)
    gathered = comm.gather(partial, root=0)
    result = None
    if rank == 0:
        ref, ref_lse = gathered[0]
        for o, l in gathered[1:]:
            merge_lse(ref, ref_lse, o, l, np)
        result = {"rows": S, "max_abs_err": float(np.abs(os_ - ref).max()),
                  "max_lse_err": float(np.abs(ls - ref_lse).max()),
                  "max_rel_err": float(np.abs(os_ - ref).max() / max(np.abs(ref).max(), 1e-300))}
    return comm.bcast(result, root=0)
