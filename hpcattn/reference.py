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
    # (b, hkv, group, n, d): query heads grouped under the K/V head they share (GQA, no copies of K/V)
    qh = (q * dtype.type(scale)).transpose(0, 2, 1, 3).reshape(b, hkv, group, nq, d)
    kh = k.transpose(0, 2, 1, 3)[:, :, None]
    vh = v.transpose(0, 2, 1, 3)[:, :, None]
    s = np.matmul(qh, kh.swapaxes(-1, -2))                 # the (Nq, Nk) scores, per head
    if causal:
        qp = np.arange(nq) if q_pos is None else np.asarray(q_pos)
        kp = np.arange(nk) if k_pos is None else np.asarray(k_pos)
        np.copyto(s, -np.inf, where=qp[:, None] < kp[None, :])
    m = s.max(axis=-1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    s -= m_safe
    np.exp(s, out=s)
    l = s.sum(axis=-1, keepdims=True)
    np.divide(s, l, out=s, where=l > 0)                    # rows with no visible key stay 0
    out = np.matmul(s, vh).reshape(b, h, nq, d).transpose(0, 2, 1, 3)
    with np.errstate(divide="ignore"):
        lse = np.where(l[..., 0] > 0, np.log(l[..., 0]) + m_safe[..., 0], -np.inf).reshape(b, h, nq)
    return out, lse
