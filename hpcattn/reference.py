"""The one reference attention: naive, with the full score matrix, float64 unless asked.

Nothing here is used by the fast paths; tests, ``--check``, the GPU kernel checks and the
benchmark's vanilla multi-head attention (``dtype`` = the input precision) use it.
"""
from __future__ import annotations

import numpy as np


def naive_attention(q, k, v, *, causal=False, scale=None, q_pos=None, k_pos=None, dtype=None):
    """Textbook attention materialising the (Nq, Nk) score matrix, computed in ``dtype``
    (default float64; e.g. float32 for a baseline in the input precision).

    Layout (batch, seq, heads, head_dim); k/v may have fewer heads (GQA).
    ``q_pos``/``k_pos`` are global positions for the causal mask (default 0..N-1).
    Returns (out, lse of shape (batch, heads, Nq)), both in ``dtype``. Rows with no
    visible key get out = 0 and lse = -inf.
    """
    dtype = np.dtype(np.float64 if dtype is None else dtype)
    q = np.asarray(q, dtype=dtype)
    k = np.asarray(k, dtype=dtype)
    v = np.asarray(v, dtype=dtype)
    b, nq, h, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    scale = 1.0 / np.sqrt(d) if scale is None else float(scale)
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * dtype.type(scale)
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
