"""The one reference attention, forward and backward: naive, with the full score matrix, float64
unless asked.

Nothing here is used by the fast paths; tests, ``--check``, the GPU kernel checks and the
benchmark's vanilla multi-head attention (``dtype`` = the input precision) use the forward; the
analytic backward (every probability materialised) is the independent reference for the
gradients, itself checked against central finite differences of the forward in the tests.
"""
from __future__ import annotations

import numpy as np


def visible_matrix(q_pos, k_pos, *, causal=False, window=None, cu_seqlens=None, align="top-left",
                   n_q=None, n_k=None):
    """bool (len(q_pos), len(k_pos)): which keys each query sees, straight from the definitions
    (FlashAttention's): query i is aligned with key ``i + offset`` (offset 0 top-left,
    ``n_k - n_q`` bottom-right, from the GLOBAL lengths ``n_q``/``n_k``); causal hides keys
    after it, ``window=(left, right)`` (-1: unbounded) keeps keys in
    ``[i + offset - left, i + offset + right]``, and ``cu_seqlens`` keeps keys of the query's own
    packed sequence. Deliberately independent of ``hpcattn.masks`` (the kernels' tile
    classifier): this is what the tests and ``--check`` compare the kernels against."""
    qp = np.asarray(q_pos, dtype=np.int64)[:, None]
    kp = np.asarray(k_pos, dtype=np.int64)[None, :]
    offset = 0 if align == "top-left" else int(n_k) - int(n_q)
    seen = np.ones((qp.shape[0], kp.shape[1]), dtype=bool)
    if causal:
        seen &= kp <= qp + offset
    left, right = (-1, -1) if window is None else (int(window[0]), int(window[1]))
    if left >= 0:
        seen &= kp >= qp + offset - left
    if right >= 0:
        seen &= kp <= qp + offset + right
    if cu_seqlens is not None:
        inner = np.asarray(cu_seqlens, dtype=np.int64)[1:-1]
        seq_q = (qp >= inner[None, :]).sum(axis=1)          # boundaries at or before the token
        seq_k = (kp.T >= inner[None, :]).sum(axis=1)
        seen &= seq_q[:, None] == seq_k[None, :]
    return seen


def _visible(causal, window, cu_seqlens, align, q_pos, k_pos, nq, nk, n_q, n_k):
    """The mask of a naive call (None: every key visible), positions defaulting to 0..n-1."""
    if not causal and window in (None, (-1, -1)) and cu_seqlens is None:
        return None
    qp = np.arange(nq) if q_pos is None else np.asarray(q_pos)
    kp = np.arange(nk) if k_pos is None else np.asarray(k_pos)
    return visible_matrix(qp, kp, causal=causal, window=window, cu_seqlens=cu_seqlens, align=align,
                          n_q=nq if n_q is None else n_q, n_k=nk if n_k is None else n_k)


def naive_attention(q, k, v, *, causal=False, scale=None, q_pos=None, k_pos=None, dtype=None,
                    window=None, cu_seqlens=None, align="top-left", n_q=None, n_k=None):
    """Textbook attention materialising the (Nq, Nk) score matrix, computed in ``dtype``
    (default float64; e.g. float32 for a baseline in the input precision).

    Layout (batch, seq, heads, head_dim); k/v may have fewer heads (GQA).
    ``q_pos``/``k_pos`` are global positions for the mask (default 0..N-1); ``window``,
    ``cu_seqlens``, ``align``, ``n_q``/``n_k`` (global lengths, default q's and k's) as for
    :func:`visible_matrix`. Returns (out, lse of shape (batch, heads, Nq)), both in ``dtype``. Rows with no
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
    seen = _visible(causal, window, cu_seqlens, align, q_pos, k_pos, nq, nk, n_q, n_k)
    if seen is not None:
        np.copyto(s, -np.inf, where=~seen)
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


def naive_attention_backward(q, k, v, dout, *, causal=False, scale=None, q_pos=None, k_pos=None,
                             window=None, cu_seqlens=None, align="top-left", n_q=None, n_k=None):
    """``(dq, dk, dv)`` in float64 of softmax attention, with every probability materialised.

    Layout (batch, seq, heads, head_dim); k/v may have fewer heads (GQA/MQA): their gradients
    sum the group's query heads. ``q_pos``/``k_pos``: global positions for the mask; the mask's
    arguments as for :func:`naive_attention`.
    Rows that see no key contribute nothing.
    """
    q, k, v, dout = (np.asarray(x, dtype=np.float64) for x in (q, k, v, dout))
    b, nq, h, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    scale = 1.0 / np.sqrt(d) if scale is None else float(scale)
    # (batch, heads, seq, d) for the matrix products
    qt = q.transpose(0, 2, 1, 3)
    kt, vt = (np.repeat(x, group, axis=2).transpose(0, 2, 1, 3) for x in (k, v))
    dot = dout.transpose(0, 2, 1, 3)
    scores = scale * (qt @ kt.transpose(0, 1, 3, 2))
    visible = _visible(causal, window, cu_seqlens, align, q_pos, k_pos, nq, nk, n_q, n_k)
    visible = np.ones((nq, nk), dtype=bool) if visible is None else visible
    scores = np.where(visible, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.exp(scores - row_max)
    total = weights.sum(axis=-1, keepdims=True)
    probs = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    # dL/dP = dout · vᵀ; the softmax Jacobian gives dS = P ∘ (dP - rowsum(P ∘ dP))
    dprobs = dot @ vt.transpose(0, 1, 3, 2)
    dscores = probs * (dprobs - (probs * dprobs).sum(axis=-1, keepdims=True))
    dq = scale * (dscores @ kt)
    dk = scale * (dscores.transpose(0, 1, 3, 2) @ qt)
    dv = probs.transpose(0, 1, 3, 2) @ dot
    # back to (batch, seq, heads, d); the group's query heads share one kv head: sum them
    dk, dv = (x.reshape(b, hkv, group, nk, d).sum(axis=2).transpose(0, 2, 1, 3) for x in (dk, dv))
    return dq.transpose(0, 2, 1, 3), dk, dv
