"""The plain-NumPy baseline ``hpcattn bench`` compares against: vanilla multi-head attention."""
from __future__ import annotations

from ..reference import naive_attention


def vanilla_mha(q, k, v, *, causal=False, scale=None, heads_at_once=True):
    """Textbook multi-head attention with the full (N x N) score matrix in the input precision
    (``hpcattn.reference``): one score matrix of B*H*N^2 elements, or B*N^2 with
    ``heads_at_once=False`` (one head at a time)."""
    import numpy as np

    if heads_at_once:
        return naive_attention(q, k, v, causal=causal, scale=scale, dtype=q.dtype)[0]
    group = q.shape[2] // k.shape[2]
    out = np.empty_like(q)
    for i in range(q.shape[2]):
        kv = slice(i // group, i // group + 1)
        out[:, :, i:i + 1] = naive_attention(q[:, :, i:i + 1], k[:, :, kv], v[:, :, kv], causal=causal,
                                             scale=scale, dtype=q.dtype)[0]
    return out
