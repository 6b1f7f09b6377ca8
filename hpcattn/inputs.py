"""Deterministic random inputs, defined per global position.

Row ``i`` of q, k or v depends only on (seed, tensor, i), never on how many ranks there are or
which layout is used, so a P-rank run and a 1-rank run see the same global arrays, and any rank
can regenerate any row.
"""
from __future__ import annotations

import numpy as np

CHUNK = 1024  # positions generated per RNG stream
TENSORS = {"q": 0, "k": 1, "v": 2, "dout": 3}  # dout: the output gradient of --backward


def random_rows(seed: int, tensor: str, pos, batch: int, heads: int, head_dim: int, dtype="float32"):
    """Rows ``pos`` (global positions) of a standard-normal (batch, N, heads, head_dim) tensor."""
    dtype = np.dtype(dtype)
    gen_dtype = np.float64 if dtype == np.float64 else np.float32
    pos = np.asarray(pos, dtype=np.int64)
    out = np.empty((batch, len(pos), heads, head_dim), dtype=dtype)
    if len(pos) == 0:
        return out
    chunks = pos // CHUNK
    for c in np.unique(chunks):
        sel = np.nonzero(chunks == c)[0]
        rng = np.random.default_rng([int(seed), TENSORS[tensor], int(c)])
        block = rng.standard_normal((batch, CHUNK, heads, head_dim), dtype=gen_dtype)
        out[:, sel] = block[:, pos[sel] - c * CHUNK]
    return out


def random_qkv(seed: int, pos, batch: int, heads: int, kv_heads: int, head_dim: int, dtype="float32"):
    """(q, k, v) rows at global positions ``pos``."""
    return (random_rows(seed, "q", pos, batch, heads, head_dim, dtype),
            random_rows(seed, "k", pos, batch, kv_heads, head_dim, dtype),
            random_rows(seed, "v", pos, batch, kv_heads, head_dim, dtype))
