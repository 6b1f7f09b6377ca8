"""Sparse softmax attention: a sliding window (Longformer's local attention) and BigBird's
window + global + random block pattern. P = softmax over an allowed set of keys per query.

Both run on one block-sparse engine (also used by Reformer on its hash-sorted sequence): the
sequence is cut into blocks, each query block lists the key blocks it looks at, and only those
(block x listed keys) score tiles are ever formed, so work and memory are O(N x keys per query).
"""
from __future__ import annotations

import numpy as np

from .base import Mixer, Param, SEED, causal_bias, masked_softmax, register, scale_of, scores

TILE_ELEMENTS = 1 << 22  # score elements formed at once (memory of one group of query blocks)


def pad_rows(xp, x, n_to):
    """Zero-pad head-major x (b, h, n, d) along the sequence to ``n_to`` rows."""
    if x.shape[2] == n_to:
        return x
    pad = xp.zeros(x.shape[:2] + (n_to - x.shape[2],) + x.shape[3:], dtype=x.dtype)
    return xp.concatenate([x, pad], axis=2)


def block_sparse_attention(xp, q, k, v, *, block, table, qblocks, out, lse, n_valid,
                           scale=None, bias_fn=None):
    """Softmax attention of query blocks ``qblocks`` over their listed key blocks.

    q, k, v: head-major (b, h, nb*block, d); rows at index >= ``n_valid`` are padding.
    table: int (H, len(qblocks), m), H in (1, h): key blocks per query block, -1 = none.
    bias_fn(qi, kj): extra additive bias (-inf hides) for query indices ``qi`` (G, block, 1) and
    key indices ``kj`` (H, G, 1, m*block), broadcastable to (b, h, G, block, m*block), or None.
    Writes rows of ``out`` (b, h, n, d) and ``lse`` (b, h, n) in place.
    """
    b, h, n, d = q.shape
    nb = n // block
    hh, nq, m = table.shape
    scale = scale or scale_of(d)
    kb, vb = (x.reshape(b, h, nb, block, d) for x in (k, v))
    qb = q.reshape(b, h, nb, block, d)
    ob, lb = out.reshape(b, h, nb, block, d), lse.reshape(b, h, nb, block)
    heads = xp.arange(h)[:, None, None]
    within = xp.arange(block)
    group = max(1, TILE_ELEMENTS // (b * h * block * m * block))
    for g0 in range(0, nq, group):
        tbl = table[:, g0:g0 + group]
        rows = qblocks[g0:g0 + group]
        idx = xp.where(tbl < 0, 0, tbl)
        if hh == 1:
            ks, vs = kb[:, :, idx[0]], vb[:, :, idx[0]]
        else:
            ks, vs = kb[:, heads, idx], vb[:, heads, idx]
        shape = (b, h, len(rows), m * block, d)
        s = scores(qb[:, :, rows], ks.reshape(shape), scale)
        kj = (idx[..., None] * block + within).reshape(hh, len(rows), 1, m * block)
        valid = xp.repeat(tbl >= 0, block, axis=-1)[:, :, None, :] & (kj < n_valid)
        bias = xp.where(valid, 0.0, -np.inf).astype(s.dtype)[None]
        if bias_fn is not None:
            qi = (rows[:, None] * block + within)[:, :, None]
            bias = bias + bias_fn(qi, kj)
        p, l = masked_softmax(xp, s, bias)
        ob[:, :, rows] = p @ vs.reshape(shape)
        lb[:, :, rows] = l


def run_block_pattern(xp, q, k, v, block, patterns, bias_fn=None):
    """Pad to whole blocks, run each (table, qblocks) pattern, cut the padding off.

    Returns (out, lse) of the unpadded length. ``bias_fn(qi, kj)`` as in
    ``block_sparse_attention``."""
    n = q.shape[2]
    npad = -(-n // block) * block
    qp, kp, vp = (pad_rows(xp, x, npad) for x in (q, k, v))
    out = xp.zeros(qp.shape[:3] + (v.shape[-1],), dtype=q.dtype)
    lse = xp.full(qp.shape[:3], -np.inf, dtype=q.dtype)
    for table, qblocks in patterns:
        if len(qblocks):
            block_sparse_attention(xp, qp, kp, vp, block=block, table=xp.asarray(table),
                                   qblocks=xp.asarray(qblocks), out=out, lse=lse, n_valid=n,
                                   bias_fn=bias_fn)
    return out[:, :, :n], lse[:, :, :n]


def dense_pattern_matrix(xp, q, k, allowed, causal):
    """Naive form of a sparse pattern: dense scores, -inf outside ``allowed`` (H|1, n, n)."""
    bias = xp.where(xp.asarray(allowed), 0.0, -np.inf).astype(q.dtype)[None]
    if causal:
        bias = bias + causal_bias(q.shape[2], xp, q.dtype)
    return masked_softmax(xp, scores(q, k), bias)[0]


def _causal_fn(xp):
    """The causal bias of ``block_sparse_attention``'s index grids, for ``xp`` arrays."""
    return lambda qi, kj: xp.where(qi >= kj, 0.0, -np.inf)


@register
class SlidingWindow(Mixer):
    name = "local"
    summary = "sliding-window softmax: query i sees keys j with |i - j| <= window (j <= i if causal)"
    reference = "Beltagy et al. 2020, Longformer (local attention)"
    time_complexity = "O(N w d)"
    memory_complexity = "O(N w)"
    params = {"window": Param(64, "keys seen on each side of a query (one-sided width w)", minimum=0)}

    def _block(self, n):
        return max(1, min(self.window, n))

    def _apply(self, xp, q, k, v, causal):
        n = q.shape[2]
        block = self._block(n)
        nb = -(-n // block)
        me = np.arange(nb)
        near = (me - 1, me) if causal else (me - 1, me, me + 1)
        table = np.stack([np.where((c >= 0) & (c < nb), c, -1) for c in near], axis=-1)[None]
        w = self.window

        def band(qi, kj):
            ok = (qi - kj <= w) & ((qi >= kj) if causal else (kj - qi <= w))
            return xp.where(ok, 0.0, -np.inf)

        return run_block_pattern(xp, q, k, v, block, [(table, me)], band)[0]

    def _matrix(self, xp, q, k, causal):
        i = np.arange(q.shape[2])
        return dense_pattern_matrix(xp, q, k, np.abs(i[:, None] - i[None, :]) <= self.window, causal)

    def memory_bytes(self, n, batch, heads, head_dim, itemsize):
        keys = 3 * self._block(n)
        scores = min(batch * heads * n * keys, TILE_ELEMENTS + batch * heads * self._block(n) * keys)
        return 4 * scores * itemsize + 8 * batch * heads * n * head_dim * itemsize


@register
class BigBird(Mixer):
    name = "bigbird"
    summary = "block-sparse softmax: sliding blocks + global blocks + random blocks per query block"
    reference = "Zaheer et al. 2020, Big Bird: Transformers for Longer Sequences (ITC)"
    time_complexity = "O(N (3 + g + r) b d + g b N d)"
    memory_complexity = "O(N (3 + g + r) b)"
    params = {"block": Param(64, "block size b", minimum=1),
              "global_blocks": Param(1, "first g blocks attend to and are attended by all", minimum=0),
              "random_blocks": Param(3, "random key blocks r per query block (per head)", minimum=0),
              "seed": SEED}

    def tables(self, n, heads, causal):
        """[(table (H, rows, m), query blocks)] for the ordinary and the global query blocks."""
        nb = -(-n // self.block)
        g = min(self.global_blocks, nb)
        rng = self.rng(n, heads, int(causal))
        m = 3 + g + self.random_blocks
        table = np.full((heads, nb - g, m), -1, dtype=np.int64)
        for row, blk in enumerate(range(g, nb)):
            fixed = {c for c in (blk - 1, blk, blk + 1) if 0 <= c < nb and (c <= blk or not causal)}
            fixed |= set(range(g))
            pool = np.array([c for c in range(blk if causal else nb) if c not in fixed], dtype=np.int64)
            for head in range(heads):
                pick = rng.choice(pool, min(self.random_blocks, len(pool)), replace=False)
                chosen = sorted(fixed | set(pick.tolist()))
                table[head, row, :len(chosen)] = chosen
        glob = np.broadcast_to(np.arange(nb), (1, g, nb))
        return [(table, np.arange(g, nb)), (glob, np.arange(g))]

    def _apply(self, xp, q, k, v, causal):
        return run_block_pattern(xp, q, k, v, self.block, self.tables(q.shape[2], q.shape[1], causal),
                                 _causal_fn(xp) if causal else None)[0]

    def _matrix(self, xp, q, k, causal):
        n, h = q.shape[2], q.shape[1]
        nb = -(-n // self.block)
        blocks = np.zeros((h, nb, nb), dtype=bool)
        for table, qblocks in self.tables(n, h, causal):
            for head in range(h):
                tbl = table[min(head, len(table) - 1)]
                for row, blk in enumerate(qblocks):
                    blocks[head, blk, tbl[row][tbl[row] >= 0]] = True
        dense = blocks.repeat(self.block, axis=1).repeat(self.block, axis=2)[:, :n, :n]
        return dense_pattern_matrix(xp, q, k, dense, causal)

    def memory_bytes(self, n, batch, heads, head_dim, itemsize):
        m = 3 + self.global_blocks + self.random_blocks
        bh = batch * heads
        tile = min(bh * n * m * self.block, TILE_ELEMENTS + bh * self.block ** 2 * m)
        glob = bh * self.global_blocks * self.block * n
        return 4 * (tile + glob) * itemsize + 8 * bh * (n + m * self.block) * head_dim * itemsize


__all__ = ["SlidingWindow", "BigBird", "block_sparse_attention", "run_block_pattern",
           "dense_pattern_matrix"]
