"""Independent float64 reference for the gradients: the full score matrix, the analytic backward.

Nothing here is used by the fast paths; tests compare against it (and check it against central
finite differences of ``reference.naive_attention``).
"""
from __future__ import annotations

import numpy as np


def naive_attention_backward(q, k, v, dout, *, causal=False, scale=None, q_pos=None, k_pos=None):
    """``(dq, dk, dv)`` in float64 of softmax attention, with every probability materialised.

    Layout (batch, seq, heads, head_dim); k/v may have fewer heads (GQA/MQA): their gradients
    sum the group's query heads. ``q_pos``/``k_pos``: global positions for the causal mask.
    Rows that see no key contribute nothing.
    """
    q, k, v, dout = (np.asarray(x, dtype=np.float64) for x in (q, k, v, dout))
    b, nq, h, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    scale = 1.0 / np.sqrt(d) if scale is None else float(scale)
    kr, vr = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = scale * np.einsum("bqhd,bkhd->bhqk", q, kr)
    visible = np.ones((nq, nk), dtype=bool)
    if causal:
        qp = np.arange(nq) if q_pos is None else np.asarray(q_pos)
        kp = np.arange(nk) if k_pos is None else np.asarray(k_pos)
        visible = qp[:, None] >= kp[None, :]
    scores = np.where(visible, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.exp(scores - row_max)
    total = weights.sum(axis=-1, keepdims=True)
    probs = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    # dL/dP = dout · vᵀ; the softmax Jacobian gives dS = P ∘ (dP - rowsum(P ∘ dP))
    dprobs = np.einsum("bqhd,bkhd->bhqk", dout, vr)
    dscores = probs * (dprobs - (probs * dprobs).sum(axis=-1, keepdims=True))
    dq = scale * np.einsum("bhqk,bkhd->bqhd", dscores, kr)
    dk = scale * np.einsum("bhqk,bqhd->bkhd", dscores, q)
    dv = np.einsum("bhqk,bqhd->bkhd", probs, dout)
    # the group's query heads share one kv head: sum their gradients
    dk = dk.reshape(b, nk, hkv, group, d).sum(axis=3)
    dv = dv.reshape(b, nk, hkv, group, d).sum(axis=3)
    return dq, dk, dv
