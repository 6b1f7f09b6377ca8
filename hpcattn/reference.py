"""Independent float64 references: naive attention with the full score matrix.

Nothing here is used by the fast paths; tests and ``--check`` compare against it.
"""
from __future__ import annotations

import numpy as np


def naive_attention(q, k, v, *, causal=False, scale=None, q_pos=None, k_pos=None):
    """Textbook attention in float64, materialising the (Nq, Nk) score matrix.

    Layout (batch, seq, heads, head_dim); k/v may have fewer heads (GQA).
    ``q_pos``/``k_pos`` are global positions for the causal mask (default 0..N-1).
    Returns (out float64, lse float64 of shape (batch, heads, Nq)). Rows with no
    visible key get out = 0 and lse = -inf.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    b, nq, h, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    scale = 1.0 / np.sqrt(d) if scale is None else float(scale)
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        qp = np.arange(nq) if q_pos is None else np.asarray(q_pos)
        kp = np.arange(nk) if k_pos is None else np.asarray(k_pos)
        s = np.where(qp[:, None] >= kp[None, :], s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m_safe)
    l = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.einsum("bhqk,bkhd->bqhd", np.where(l > 0, p / l, 0.0), v)
        lse = np.where(l[..., 0] > 0, np.log(l[..., 0]) + m_safe[..., 0], -np.inf)
    return out, lse
