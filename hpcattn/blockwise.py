"""Blockwise (online-softmax) attention on one rank.

Queries are processed in tiles of ``block_q`` rows, keys/values are streamed in tiles of
``block_k`` rows; each query tile keeps a running max ``m``, running sum ``l`` and an
unnormalised accumulator, so the (N x N) score matrix never exists: memory is O(N·d) plus one
(block_q x block_k) score tile per head. Masks (causal, sliding windows, packed sequences:
``hpcattn.masks``) work on *global positions* (``q_pos``/``k_pos``), which is what lets the ring
apply them to any layout; tiles the mask hides entirely are skipped (so a window costs O(N·w)),
tiles it shows entirely are computed without a mask, and only the others get an additive 0/-inf
mask tile.

On CPU a tile costs two GEMMs and one elementwise pass (see ``PartialAttention``): the scale is
folded into Q, the running max into the score GEMM, and the row sums into the value GEMM. Tiles are sized for one core's L2; run one BLAS thread per rank (``hpcattn._threads``).

This is the NumPy backend's kernel (``hpcattn.backend``); CuPy arrays go to ``hpcattn.gpu``.
"""
from __future__ import annotations

import numpy as np

from .masks import PARTIAL, resolve, tile_bounds
from .validate import attention_scale, causal_positions

# Tiles: a (512 x 512) float32 score tile is 1 MiB, about one core's L2; measured fastest at
# d=64 (see docs/performance-notes.md). With GQA the g query heads of a kv head share the tile rows.
DEFAULT_BLOCK_ROWS = 512
DEFAULT_BLOCK_K = 512
DEFAULT_BLOCK_Q = DEFAULT_BLOCK_ROWS  # for callers that read it; divided by the GQA group size

# Fast-path bounds: a tile whose row sums exceed FAST_MAX relative to the running max is
# recomputed on the exact path; running sums above RENORM are renormalised.
FAST_MAX = 2.0 ** 32
RENORM = 2.0 ** 16


def attention(q, k, v, *, causal: bool = False, scale: float | None = None,
              q_pos=None, k_pos=None, block_q: int | None = None, block_k: int | None = None,
              progress=None, mask=None):
    """Exact softmax attention of NumPy arrays, computed blockwise (inputs are not validated:
    ``hpcattn.attention`` checks them and then calls this for NumPy arrays).

    Parameters
    ----------
    q : array (batch, Nq, heads, head_dim)
    k, v : arrays (batch, Nk, kv_heads, head_dim); ``heads % kv_heads == 0`` (GQA/MQA).
    causal : query at position i sees keys at positions j <= i.
    scale : score scale, default ``1/sqrt(head_dim)``.
    q_pos, k_pos : global positions of the rows (default ``0..N-1``), used by the mask.
    progress : optional callable run between tiles (the ring uses it to progress MPI).
    mask : a ``hpcattn.masks.Mask`` (window, packed sequences, alignment); replaces ``causal``.
        Unbound masks are bound to this call's lengths.

    Returns
    -------
    out : (batch, Nq, heads, head_dim), dtype of q.
    lse : (batch, heads, Nq) log-sum-exp of the scaled scores (float32 for float32 inputs,
        float64 for float64). Rows that see no key get out = 0 and lse = -inf.
    """
    scale = attention_scale(scale, q.shape[3])
    mask = resolve(mask, causal, q.shape[1], k.shape[1])
    if not mask.trivial:
        q_pos, k_pos = causal_positions(q_pos, k_pos, q.shape[1], k.shape[1])
    part = PartialAttention(q, k.shape[2], causal=causal, scale=scale, q_pos=q_pos,
                            block_q=block_q, block_k=block_k, mask=mask)
    part.add(k, v, k_pos=k_pos, progress=progress)
    return part.result()


class PartialAttention:
    """Online softmax with the running max folded into the score GEMM (NumPy).

    Queries are kept as ``[scale*q, -m]`` (one row per query and head; the g query heads sharing a
    kv head are adjacent rows of one "slab" per batch and kv head), keys and values as
    ``[k, 1]``/``[v, 1]``. A tile's scores ``[scale*q, -m] @ [k, 1]^T`` are already shifted by the
    row's running max ``m``, and ``[acc, l] += exp(s) @ [v, 1]`` gives the weighted values and the
    row sums in one GEMM: a tile costs two GEMMs and ONE elementwise pass (exp), not the
    textbook max/subtract/exp/sum. ``m`` need not be the exact max, only close enough that exp
    cannot overflow: a tile whose sums exceed FAST_MAX (or are not finite) is redone on the exact
    path (row max, subtract, exp), which also serves while any row of the tile has seen no key.
    (``exp2`` with log2(e) folded into q is faster still, but rounding ``scale*log2(e)*q`` to
    float32 costs accuracy at large scores; see docs/performance-notes.md.)

    The state persists between ``add`` calls, so a ring rank folds in every arriving block with
    no per-block output and no merge.
    """

    def __init__(self, q, kv_heads, *, causal, scale, q_pos, block_q=None, block_k=None, mask=None):
        b, nq, h, d = q.shape
        self.g, self.d, self.dt = h // kv_heads, d, q.dtype
        self.b, self.hkv, self.nq, self.h = b, kv_heads, nq, h
        self.slabs = b * kv_heads
        # a bound mask (the ring binds it to the global lengths); else plain causal or nothing
        self.mask = resolve(mask, causal)
        self.positioned = not self.mask.trivial
        self.q_pos = causal_positions(q_pos, None, nq, 0)[0] if self.positioned else None
        self.block_q = block_q or max(1, DEFAULT_BLOCK_ROWS // self.g)
        self.block_k = block_k or DEFAULT_BLOCK_K
        scale = attention_scale(scale, d)
        # a fresh array: the caller's q is never touched
        qa = np.empty((b, kv_heads, nq, self.g, d + 1), dtype=self.dt)
        np.multiply(q.reshape(b, nq, kv_heads, self.g, d).transpose(0, 2, 1, 3, 4),
                    self.dt.type(scale), out=qa[..., :d])
        qa[..., d] = 0
        self.qa = qa.reshape(self.slabs, nq * self.g, d + 1)
        self.acc = np.zeros((self.slabs, nq * self.g, d + 1), dtype=self.dt)  # [..., d]: sum l
        self.m = np.zeros((self.slabs, nq * self.g), dtype=self.dt)
        self.q_tiles = tile_bounds(nq, self.block_q, self.q_pos)
        self.fast = np.zeros((len(self.q_tiles), self.slabs), dtype=bool)
        self._s = self._bias = np.empty(0, dtype=self.dt)
        self._t = np.empty(min(self.block_q, nq) * self.g * (d + 1), dtype=self.dt)

    def packed_size(self, n: int) -> int:
        return packed_size(self.slabs, n, self.d)

    def pack(self, k, v, buf):
        pack_kv(k, v, buf)

    def add(self, k, v, *, k_pos=None, progress=None):
        buf = np.empty(self.packed_size(k.shape[1]), dtype=self.dt)
        self.pack(k, v, buf)
        self.add_packed(buf, k.shape[1], k_pos, progress)

    def add_packed(self, buf, n, k_pos, progress=None):
        """Fold in the key block packed in ``buf`` (``n`` keys at positions ``k_pos``)."""
        d, g, mask = self.d, self.g, self.mask
        half = self.slabs * n * (d + 1)
        ka = buf[:half].reshape(self.slabs, n, d + 1)
        va = buf[half: 2 * half].reshape(self.slabs, n, d + 1)
        if self.positioned:
            k_pos = causal_positions(None, k_pos, 0, n)[1]
        k_tiles = tile_bounds(n, self.block_k, k_pos if self.positioned else None)
        classes = mask.tile_classes(self.q_tiles, k_tiles)   # NONE tiles are never touched
        need = min(self.block_q, self.nq) * g * min(self.block_k, n)
        if self._s.size < need:
            self._s = np.empty(need, dtype=self.dt)
        if self._bias.size < need and (classes == PARTIAL).any():  # only masks need it
            self._bias = np.empty(need, dtype=self.dt)
        with np.errstate(over="ignore", invalid="ignore"):
            for i, (qs, qe, _, _) in enumerate(self.q_tiles):
                cols = np.flatnonzero(classes[i])
                if not len(cols):
                    continue
                r0, r1 = qs * g, qe * g
                rows = r1 - r0
                tmp = self._t[: rows * (d + 1)].reshape(rows, d + 1)
                q_rep = np.repeat(self.q_pos[qs:qe], g) if self.positioned else None
                for j in cols:
                    ks, ke = k_tiles[j][:2]
                    s = self._s[: rows * (ke - ks)].reshape(rows, ke - ks)
                    bias = None
                    if classes[i, j] == PARTIAL:  # one additive mask tile for every slab
                        bias = mask.bias(q_rep, k_pos[ks:ke], self.dt,
                                         out=self._bias[: rows * (ke - ks)].reshape(rows, ke - ks))
                    for sl in range(self.slabs):
                        self.fast[i, sl] = _tile(self.qa[sl, r0:r1], ka[sl, ks:ke], va[sl, ks:ke],
                                                 self.acc[sl, r0:r1], self.m[sl, r0:r1], s, tmp,
                                                 bias, self.fast[i, sl], d)
                    if progress is not None:
                        progress()

    def result(self):
        """``(out, lse)`` in the caller's layouts; rows that saw no key: out 0, lse -inf.

        The state is spent: the scaled queries are dropped first and the output is divided
        straight into the caller's layout, so the result phase never holds a second copy of
        the output beside the accumulator (each copy is sequence length lost at max N)."""
        b, hkv, nq, g, d = self.b, self.hkv, self.nq, self.g, self.d
        self.qa = None
        l = self.acc[:, :, d]
        seen = l > 0
        l_safe = np.where(seen, l, 1)
        out = np.empty((b, nq, self.h, d), dtype=self.dt)
        np.divide(self.acc.reshape(b, hkv, nq, g, d + 1)[..., :d],
                  l_safe.reshape(b, hkv, nq, g, 1),
                  out=out.reshape(b, nq, hkv, g, d).transpose(0, 2, 1, 3, 4))
        # in float64: m may be large, and m + log(l) must not lose log(l)'s digits
        lse = np.where(seen, self.m + np.log(l_safe, dtype=np.float64), -np.inf).astype(self.dt)
        lse = lse.reshape(b, hkv, nq, g).transpose(0, 1, 3, 2).reshape(b, self.h, nq)
        return out, lse


def packed_size(slabs: int, n: int, d: int) -> int:
    """Elements of a packed block of ``n`` keys (:func:`pack_kv`) for ``slabs`` = batch x kv heads."""
    return 2 * slabs * n * (d + 1)


def pack_kv(k, v, buf):
    """``[k, 1]`` then ``[v, 1]``, each (batch x kv heads, n, d+1), into the flat ``buf``: the
    block layout the ring sends and the CPU states fold in."""
    b, n, hkv, d = k.shape
    half = b * hkv * n * (d + 1)
    for x, part in ((k, buf[:half]), (v, buf[half: 2 * half])):
        xa = part.reshape(b, hkv, n, d + 1)
        xa[..., :d] = x.transpose(0, 2, 1, 3)
        xa[..., d] = 1


def _scores(qt, kt, s, bias):
    np.matmul(qt, kt.T, out=s)
    if bias is not None:
        s += bias


def _tile(qt, kt, vt, acc, m, s, tmp, bias, fast, d):
    """Fold one (query tile x key tile) of one slab into ``acc``/``m``; returns whether the
    next tile may take the fast path (every row has seen a key)."""
    _scores(qt, kt, s, bias)
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
        _scores(qt, kt, s, bias)
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
