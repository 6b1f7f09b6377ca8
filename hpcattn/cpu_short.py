"""Attention of many queries against a few keys (decode-like / split-KV shapes), in NumPy.

There the blockwise kernel's tiles are skinny GEMMs and its O(N*d) passes (the scaled ``[q, -m]``
copy, ``[k, 1]``/``[v, 1]`` packing, the accumulator, the final divide and transpose) cost more
than the arithmetic: 100,000 queries against 16 keys ran at ~3 GFLOP/s. With all keys of a head
in one score tile the online softmax is not needed: per head and chunk of query rows, scores,
the exact row max, exp, row sums and one GEMM for the output, reading q, k, v in place (strided
views are BLAS-able) and writing each output row once. The chunk keeps the score tile about
one core's L2. (A few queries against many keys stays on the blockwise kernel with wide key
tiles: there one score tile over all keys leaves the cache and measured slower.)

Used for unmasked calls and plain causal on default positions (every row then sees key 0);
everything else stays on the blockwise kernel.
"""
from __future__ import annotations

import numpy as np

#: keys at most this many: one score tile per query chunk
SHORT_KEYS = 128
TILE_SCORES = 2 ** 18            # ~1 MiB of float32 scores per chunk


def applies(nq: int, nk: int) -> bool:
    """Whether this kernel takes a call with ``nq`` queries and ``nk`` keys (more queries than
    keys, and at most SHORT_KEYS keys)."""
    return 0 < nk <= SHORT_KEYS and nq > nk


def attention(q, k, v, *, causal, scale, shares=None, out=None, lse=None):
    """``(out, lse)`` like ``blockwise.attention`` (default positions; causal top-left), for the
    (batch, head) pairs in ``shares`` (default all) into ``out``/``lse`` (default fresh)."""
    b, nq, h, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    out = np.empty_like(q) if out is None else out
    lse = np.empty((b, h, nq), dtype=q.dtype) if lse is None else lse
    rows = max(1, min(nq, TILE_SCORES // nk))
    # scores transposed (keys x query rows): the row max and sums reduce over the short axis
    # with whole-row vector operations instead of one tiny reduction per query
    st_buf = np.empty((nk, rows), dtype=q.dtype)
    o_buf = np.empty((rows, d), dtype=q.dtype)
    kidx = np.arange(nk)[:, None]
    scale = q.dtype.type(scale)
    for i, j in shares if shares is not None else [(i, j) for i in range(b) for j in range(h)]:
        kt, vt = k[i, :, j // g, :], v[i, :, j // g, :]
        for r0 in range(0, nq, rows):
            r1 = min(r0 + rows, nq)
            st, ot = st_buf[:, : r1 - r0], o_buf[: r1 - r0]
            np.matmul(kt, q[i, r0:r1, j, :].T, out=st)
            if causal and r0 < nk - 1:   # only the first nk rows can see fewer than all keys
                np.putmask(st, kidx > np.arange(r0, r1)[None, :], -np.inf)
            mx = st.max(axis=0)
            st -= mx
            st *= scale
            np.exp(st, out=st)
            ssum = st.sum(axis=0)
            np.matmul(st.T, vt, out=ot)
            np.divide(ot, ssum[:, None], out=out[i, r0:r1, j, :])
            # in float64: m may be large, and m + log(l) must not lose log(l)'s digits
            lse[i, j, r0:r1] = mx * np.float64(scale) + np.log(ssum, dtype=np.float64)
    return out, lse
