"""Blockwise (online-softmax) attention on one rank.

Queries are processed in tiles of ``block_q`` rows, keys/values are streamed in tiles of
``block_k`` rows; each query tile keeps a running max ``m``, running sum ``l`` and an
unnormalised accumulator, so the (N x N) score matrix never exists: memory is O(N·d) plus one
(block_q x block_k) score tile per head. Causal masking works on *global positions*
(``q_pos``/``k_pos``), which is what lets the ring apply it to any layout; tiles that are fully
masked are skipped, tiles that are fully visible are computed without a mask.

CuPy inputs go to the CUDA kernels in ``kernels/`` (see ``hpcattn.gpu``); NumPy inputs run here.
"""
from __future__ import annotations

import numpy as np

from .backend import is_gpu_array
from .validate import check_qkv

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 512


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
                            block_q or DEFAULT_BLOCK_Q, block_k or DEFAULT_BLOCK_K, progress)


def _tile_bounds(pos, block):
    """(start, stop, min position, max position) of each tile of ``block`` rows."""
    n = len(pos)
    out = []
    for s in range(0, n, block):
        t = pos[s:s + block]
        out.append((s, min(s + block, n), int(t.min()), int(t.max())))
    return out


def _attention_numpy(q, k, v, causal, scale, q_pos, k_pos, block_q, block_k, progress):
    b, nq, h, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    dt = q.dtype
    # (b, hkv, n, g, d): the g query heads that share a kv head sit next to each other, so a
    # query tile reshapes to (b, hkv, tile*g, d) without a copy.
    # (a fresh array: scaling must never touch the caller's q, even when the view is contiguous)
    qh = np.empty((b, hkv, nq, g, d), dtype=dt)
    np.multiply(q.reshape(b, nq, hkv, g, d).transpose(0, 2, 1, 3, 4), dt.type(scale), out=qh)
    kh = np.ascontiguousarray(k.transpose(0, 2, 1, 3))  # (b, hkv, nk, d)
    vh = np.ascontiguousarray(v.transpose(0, 2, 1, 3))
    out = np.zeros((b, hkv, nq, g, d), dtype=dt)
    lse = np.full((b, hkv, nq, g), -np.inf, dtype=dt)

    q_tiles = _tile_bounds(q_pos, block_q) if causal else [(s, min(s + block_q, nq), 0, 0)
                                                             for s in range(0, nq, block_q)]
    k_tiles = _tile_bounds(k_pos, block_k) if causal else [(s, min(s + block_k, nk), 0, 0)
                                                             for s in range(0, nk, block_k)]
    for qs, qe, qmin, qmax in q_tiles:
        rows = (qe - qs) * g
        qt = qh[:, :, qs:qe].reshape(b, hkv, rows, d)
        m = np.full((b, hkv, rows), -np.inf, dtype=dt)
        l = np.zeros((b, hkv, rows), dtype=dt)
        acc = np.zeros((b, hkv, rows, d), dtype=dt)
        for ks, ke, kmin, kmax in k_tiles:
            if causal and qmax < kmin:
                continue  # every key in this tile is in every query's future
            s = np.matmul(qt, kh[:, :, ks:ke].swapaxes(-1, -2))  # (b, hkv, rows, tk)
            if causal and qmin < kmax:  # straddles the diagonal: mask per element
                visible = np.repeat(q_pos[qs:qe], g)[:, None] >= k_pos[None, ks:ke]
                np.putmask(s, ~np.broadcast_to(visible, s.shape), -np.inf)
            m_new = np.maximum(m, s.max(axis=-1))
            m_safe = np.where(np.isneginf(m_new), 0, m_new).astype(dt, copy=False)
            s -= m_safe[..., None]
            np.exp(s, out=s)
            alpha = np.exp(m - m_safe)
            l *= alpha
            l += s.sum(axis=-1)
            acc *= alpha[..., None]
            acc += np.matmul(s, vh[:, :, ks:ke])
            m = m_new
            if progress is not None:
                progress()
        seen = l > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            acc /= np.where(seen, l, 1)[..., None]
            tile_lse = np.where(seen, np.log(np.where(seen, l, 1)) + m, -np.inf)
        out[:, :, qs:qe] = acc.reshape(b, hkv, qe - qs, g, d)
        lse[:, :, qs:qe] = tile_lse.reshape(b, hkv, qe - qs, g)
    out = out.transpose(0, 2, 1, 3, 4).reshape(b, nq, h, d)
    lse = lse.transpose(0, 1, 3, 2).reshape(b, h, nq)
    return out, lse


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
