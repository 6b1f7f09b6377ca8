"""Blockwise (online-softmax) attention on one rank.

Queries are processed in tiles of ``block_q`` rows, keys/values are streamed in tiles of
``block_k`` rows; each query tile keeps a running max ``m``, running sum ``l`` and an
unnormalised accumulator, so the (N x N) score matrix never exists: memory is O(N·d) plus one
(block_q x block_k) score tile per head. Causal masking works on *global positions*
(``q_pos``/``k_pos``), which is what lets the ring apply it to any layout; tiles that are fully
masked are skipped, tiles that are fully visible are computed without a mask.

On CPU a tile costs two GEMMs and one elementwise pass (see ``_attention_numpy``): the scale is
folded into Q, the running max into the score GEMM, and the row sums into the value GEMM. Tiles are sized for one core's L2; run one BLAS thread per rank (``hpcattn._threads``).

CuPy inputs go to the CUDA kernels in ``kernels/`` (see ``hpcattn.gpu``); NumPy inputs run here.
"""
from __future__ import annotations

import numpy as np

from .backend import is_gpu_array
from .validate import check_qkv

# Tiles: a (512 x 512) float32 score tile is 1 MiB, about one core's L2; measured fastest at
# d=64 (see /work/notes/perf.md). With GQA the g query heads of a kv head share the tile rows.
DEFAULT_BLOCK_ROWS = 512
DEFAULT_BLOCK_K = 512
DEFAULT_BLOCK_Q = DEFAULT_BLOCK_ROWS  # for callers that read it; divided by the GQA group size

# Fast-path bounds: a tile whose row sums exceed FAST_MAX relative to the running max is
# recomputed on the exact path; running sums above RENORM are renormalised.
FAST_MAX = 2.0 ** 32
RENORM = 2.0 ** 16


def attention(q, k, v, *, causal: bool = False, scale: float | None = None,
              q_pos=None, k_pos=None, block_q: int | None = None, block_k: int | None = None,
              check_finite: bool = True, progress=None):
    """Exact softmax attention, computed blockwise.

    Parameters
    ----------
    q : array (batch, Nq, heads, head_dim)
    k, v : arrays (batch, Nk, kv_heads, head_dim); ``heads % kv_heads == 0`` (GQA/MQA).
    causal : query at position i sees keys at positions j <= i.
    scale : score scale, default ``1/sqrt(head_dim)``.
    q_pos, k_pos : global positions of the rows (default ``0..N-1``), used by the causal mask.
    progress : optional callable run between tiles (the ring uses it to progress MPI).

    Returns
    -------
    out : (batch, Nq, heads, head_dim), dtype of q.
    lse : (batch, heads, Nq) log-sum-exp of the scaled scores (float32 for float32/16 inputs,
        float64 for float64). Rows that see no key get out = 0 and lse = -inf.
    """
    check_qkv(q, k, v, check_finite=check_finite)
    d = q.shape[3]
    scale = 1.0 / np.sqrt(d) if scale is None else float(scale)
    if not np.isfinite(scale):
        raise ValueError(f"scale {scale} is not finite; expected a finite number")
    nq, nk = q.shape[1], k.shape[1]
    if causal:
        q_pos = np.arange(nq, dtype=np.int64) if q_pos is None else np.asarray(q_pos, np.int64)
        k_pos = np.arange(nk, dtype=np.int64) if k_pos is None else np.asarray(k_pos, np.int64)
        if q_pos.shape != (nq,) or k_pos.shape != (nk,):
            raise ValueError(f"q_pos/k_pos have shapes {q_pos.shape}/{k_pos.shape}; "
                             f"expected ({nq},)/({nk},)")
    if is_gpu_array(q):
        from .gpu import attention_gpu

        return attention_gpu(q, k, v, causal=causal, scale=scale, q_pos=q_pos, k_pos=k_pos)
    return _attention_numpy(q, k, v, causal, scale, q_pos, k_pos,
                            block_q or max(1, DEFAULT_BLOCK_ROWS // (q.shape[2] // k.shape[2])),
                            block_k or DEFAULT_BLOCK_K, progress)


def _tile_bounds(pos, block):
    """(start, stop, min position, max position) of each tile of ``block`` rows."""
    n = len(pos)
    out = []
    for s in range(0, n, block):
        t = pos[s:s + block]
        out.append((s, min(s + block, n), int(t.min()), int(t.max())))
    return out


def _tiles(n, block, pos, causal):
    if causal:
        return _tile_bounds(pos, block)
    return [(s, min(s + block, n), 0, 0) for s in range(0, n, block)]


def _augmented(x, b, hkv, n, d, dt):
    """(b*hkv, n, d+1) copy of k or v (batch, n, hkv, d) with a column of ones appended."""
    xa = np.empty((b, hkv, n, d + 1), dtype=dt)
    xa[..., :d] = x.transpose(0, 2, 1, 3)
    xa[..., d] = 1
    return xa.reshape(b * hkv, n, d + 1)


def _attention_numpy(q, k, v, causal, scale, q_pos, k_pos, block_q, block_k, progress):
    """Online softmax with the running max folded into the score GEMM.

    Scores are ``s = [scale*q, -m] @ [k, 1]^T``, i.e. already shifted by the row's running max
    ``m``; ``[acc, l] += exp(s) @ [v, 1]`` then yields the weighted values and the row sums in one
    GEMM. So a tile costs two GEMMs and ONE elementwise pass (exp), not the textbook
    max/subtract/exp/sum. ``m`` need not be the exact max, only close enough that exp cannot
    overflow: a tile whose sums exceed FAST_MAX (or are not finite) is redone on the exact path
    (row max, subtract, exp), which is also used while any row has seen no key.
    (``exp2`` with log2(e) folded into q is faster still, but rounding ``scale*log2(e)*q`` to
    float32 costs accuracy at large scores; see /work/notes/perf.md.)
    """
    b, nq, h, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    dt = q.dtype
    slabs = b * hkv
    # (b, hkv, nq, g, d+1): the g query heads sharing a kv head are adjacent rows, so a query tile
    # is rows [qs*g, qe*g) of one slab; the last column holds -m (a fresh array: the caller's q
    # is never touched).
    qa = np.empty((b, hkv, nq, g, d + 1), dtype=dt)
    np.multiply(q.reshape(b, nq, hkv, g, d).transpose(0, 2, 1, 3, 4), dt.type(scale),
                out=qa[..., :d])
    qa = qa.reshape(slabs, nq * g, d + 1)
    ka = _augmented(k, b, hkv, nk, d, dt)
    va = _augmented(v, b, hkv, nk, d, dt)
    out = np.empty((slabs, nq * g, d), dtype=dt)
    lse = np.empty((slabs, nq * g), dtype=dt)
    q_tiles = _tiles(nq, block_q, q_pos, causal)
    k_tiles = _tiles(nk, block_k, k_pos, causal)
    s_buf = np.empty(min(block_q, nq) * g * min(block_k, nk), dtype=dt)
    t_buf = np.empty(min(block_q, nq) * g * (d + 1), dtype=dt)
    with np.errstate(over="ignore", invalid="ignore"):
        for qs, qe, qmin, qmax in q_tiles:
            r0, r1 = qs * g, qe * g
            rows = r1 - r0
            acc = np.zeros((slabs, rows, d + 1), dtype=dt)   # [:, :, d] is the running sum l
            m = np.zeros((slabs, rows), dtype=dt)
            qa[:, r0:r1, d] = 0
            fast = [False] * slabs
            tmp = t_buf[: rows * (d + 1)].reshape(rows, d + 1)
            q_rep = np.repeat(q_pos[qs:qe], g) if causal else None
            for ks, ke, kmin, kmax in k_tiles:
                if causal and qmax < kmin:
                    continue  # every key in this tile is in every query's future
                s = s_buf[: rows * (ke - ks)].reshape(rows, ke - ks)
                # straddles the diagonal: mask per element (same mask for every slab)
                hidden = q_rep[:, None] < k_pos[None, ks:ke] if causal and qmin < kmax else None
                for sl in range(slabs):
                    fast[sl] = _tile(qa[sl, r0:r1], ka[sl, ks:ke], va[sl, ks:ke], acc[sl], m[sl],
                                     s, tmp, hidden, fast[sl], d)
                if progress is not None:
                    progress()
            l = acc[:, :, d]
            seen = l > 0
            l_safe = np.where(seen, l, 1)
            np.divide(acc[:, :, :d], l_safe[..., None], out=out[:, r0:r1])
            # in float64: m may be large, and m + log(l) must not lose log(l)'s digits
            lse[:, r0:r1] = np.where(seen, m + np.log(l_safe, dtype=np.float64), -np.inf)
    out = out.reshape(b, hkv, nq, g, d).transpose(0, 2, 1, 3, 4).reshape(b, nq, h, d)
    lse = lse.reshape(b, hkv, nq, g).transpose(0, 1, 3, 2).reshape(b, h, nq)
    return out, lse


def _scores(qt, kt, s, hidden):
    np.matmul(qt, kt.T, out=s)
    if hidden is not None:
        np.putmask(s, hidden, -np.inf)


def _tile(qt, kt, vt, acc, m, s, tmp, hidden, fast, d):
    """Fold one (query tile x key tile) of one slab into ``acc``/``m``; returns whether the
    next tile may take the fast path (every row has seen a key)."""
    _scores(qt, kt, s, hidden)
    if fast:
        np.exp(s, out=s)
        np.matmul(s, vt, out=tmp)
        if tmp[:, d].max() <= FAST_MAX:     # False for inf/nan: then redo exactly
            acc += tmp
            l = acc[:, d]
            if l.max() > RENORM:            # keep headroom: shift m by whole numbers
                delta = np.floor(np.log(np.maximum(l, 1)))
                acc *= np.exp(-delta)[:, None]
                m += delta
                np.negative(m, out=qt[:, d])
            return True
        _scores(qt, kt, s, hidden)
    # m stays a whole number (exact in the GEMM column and in m + delta), so the shift of later
    # tiles is exactly the one earlier tiles were rescaled by
    r = np.ceil(s.max(axis=1))              # row max relative to m; -inf where all masked
    fresh = acc[:, d] == 0
    delta = np.where(fresh, r, np.maximum(r, 0))
    delta[np.isneginf(r)] = 0
    s -= delta[:, None]
    np.exp(s, out=s)
    np.matmul(s, vt, out=tmp)
    # rows that had seen no key hold zeros; their delta may be far below 0 (exp(-delta) = inf)
    acc *= np.where(fresh, 0, np.exp(-delta))[:, None]
    acc += tmp
    m += delta
    np.negative(m, out=qt[:, d])
    return bool((acc[:, d] > 0).all())


def merge_partials(out, lse, out_b, lse_b):
    """Merge partial attention ``(out_b, lse_b)`` over other keys into ``(out, lse)`` in place.

    ``out``: (batch, N, heads, d); ``lse``: (batch, heads, N). Uses the log-sum-exp weights, so
    the merged result equals attention over the union of the two key sets.
    """
    from .backend import array_module

    xp = array_module(out)
    new = xp.logaddexp(lse, lse_b)
    finite = xp.isfinite(new)
    safe = xp.where(finite, new, 0)
    wa = xp.where(finite, xp.exp(lse - safe), 0).astype(out.dtype, copy=False)
    wb = xp.where(finite, xp.exp(lse_b - safe), 0).astype(out.dtype, copy=False)
    out *= wa.transpose(0, 2, 1)[..., None]
    out += out_b * wb.transpose(0, 2, 1)[..., None]
    lse[...] = new
    return out, lse
