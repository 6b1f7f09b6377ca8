"""The plain-NumPy baseline ``hpcattn bench`` compares against: vanilla multi-head attention."""
from __future__ import annotations


def vanilla_mha(q, k, v, *, causal=False, scale=None, heads_at_once=True):
    """Textbook multi-head attention with the full (N x N) score matrix, in place where NumPy
    allows (the strongest plain-NumPy baseline: one score matrix of B*H*N^2 elements, or B*N^2
    with ``heads_at_once=False``)."""
    import numpy as np

    b, n, h, d = q.shape
    g = h // k.shape[2]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    qh = q.transpose(0, 2, 1, 3) * q.dtype.type(scale)
    kh = k.transpose(0, 2, 1, 3)
    vh = v.transpose(0, 2, 1, 3)
    out = np.empty((b, h, n, d), dtype=q.dtype)
    groups = [slice(0, h)] if heads_at_once else [slice(i, i + 1) for i in range(h)]
    mask = np.triu(np.ones((n, n), dtype=bool), 1) if causal else None
    for hs in groups:
        kv = [i // g for i in range(hs.start, hs.stop)]
        s = np.matmul(qh[:, hs], kh[:, kv].swapaxes(-1, -2))
        if causal:
            np.copyto(s, -np.inf, where=mask)
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        np.matmul(s, vh[:, kv], out=out[:, hs])
        del s
    return out.transpose(0, 2, 1, 3)
