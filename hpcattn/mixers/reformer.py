"""Reformer LSH attention (Kitaev et al. 2020): shared-QK softmax attention restricted by
angular locality-sensitive hashing.

Keys are the normalised queries (k_j = q_j / |q_j|). Each hash round r draws a random rotation
R_r and buckets every position by argmax([xR_r, -xR_r]); positions are sorted by (bucket,
position), cut into chunks of c, and each chunk attends to itself and the previous chunk (the
first to the last). A position never attends to itself unless nothing else is visible (score
-1e5). Rounds are combined by their log-sum-exp, with each key's weight divided by the number
of rounds in which it was seen, so P is exactly the softmax over the union of the rounds' sets:
P_ij = exp(s_ij) / sum_{l in U(i)} exp(s_il) for j in U(i) = union_r {j : chunk_r(j) in
{chunk_r(i), chunk_r(i) - 1}}. With ``causal`` P is lower-triangular, but (as in the paper) which
earlier keys a query sees depends on where later tokens hash, since they take chunk slots.
apply runs the block-sparse engine on the sorted sequence
(O(r N (log N + c d)) time, O(r N c) memory); matrix builds U(i) densely.
"""
from __future__ import annotations

import numpy as np

from ..errors import HpcattnError
from .base import Mixer, Param, SEED, as_xp, masked_softmax, register, scores
from .sparse import run_block_pattern

SELF_SCORE = -1e5


@register
class Reformer(Mixer):
    name = "reformer"
    summary = "LSH attention: shared QK, hash-sorted chunks attend to their own and previous chunk"
    reference = "Kitaev et al. 2020, Reformer: The Efficient Transformer"
    time_complexity = "O(r N (log N + c d))"
    memory_complexity = "O(r N c)"
    inputs = "qv"
    params = {"chunk": Param(64, "chunk length c", minimum=1),
              "rounds": Param(2, "hash rounds r", minimum=1),
              "buckets": Param(0, "buckets per round (even; 0: about N / c)", minimum=0),
              "seed": SEED}

    def n_buckets(self, n):
        if self.buckets % 2:
            raise HpcattnError(f"reformer parameter buckets={self.buckets} is odd; expected an even number")
        return self.buckets or max(2, 2 * -(-n // (2 * self.chunk)))

    def hashes(self, xp, kn):
        """(rounds, b, h, n) bucket of every position, from unit keys kn (b, h, n, d)."""
        b, h, n, d = kn.shape
        nb = self.n_buckets(n)
        rot = as_xp(xp, self.rng(h, d, nb).standard_normal((self.rounds, h, d, nb // 2)), kn)
        proj = kn[None] @ rot[:, None]                       # (r, b, h, n, nb/2)
        return xp.argmax(xp.concatenate([proj, -proj], axis=-1), axis=-1)

    def _layout(self, xp, q):
        """Unit keys, per-round sort order (r, b, h, n) and chunk of every position (r, b, h, n)."""
        kn = q / xp.maximum(xp.sqrt((q * q).sum(axis=-1, keepdims=True)), 1e-30)
        n = q.shape[2]
        order = xp.argsort(self.hashes(xp, kn) * n + xp.arange(n), axis=-1, kind="stable")
        rank = xp.empty_like(order)
        xp.put_along_axis(rank, order, xp.broadcast_to(xp.arange(n), order.shape), axis=-1)
        return kn, order, rank // self.chunk

    def _neighbours(self, ci, cj, nc):
        return (cj == ci) | (cj == (ci - 1) % nc)

    def _bias(self, xp, qp, kp, causal):
        bias = xp.where(qp == kp, SELF_SCORE, 0.0)
        return bias + xp.where(qp >= kp, 0.0, -np.inf) if causal else bias

    def _apply(self, xp, q, k, v, causal):
        b, h, n, d = q.shape
        kn, order, chunk_of = self._layout(xp, q)
        nc = -(-n // self.chunk)
        me = np.arange(nc)
        table = (me[:, None] if nc == 1 else np.stack([me, (me - 1) % nc], axis=-1))[None]
        npad = nc * self.chunk

        def gather(x, idx):
            return xp.take_along_axis(x, idx, axis=2)

        def counts(qp, kp):
            """In how many rounds key kp is in query qp's set (duplicates are divided out)."""
            total = 0
            for c in chunk_of:
                ci = gather(c, qp.reshape(b, h, -1)).reshape(qp.shape)
                cj = gather(c, kp.reshape(b, h, -1)).reshape(kp.shape)
                total = total + self._neighbours(ci, cj, nc)
            return total

        outs, lses = [], []
        for order_r in order:
            pos = xp.concatenate([order_r, xp.full((b, h, npad - n), -1, dtype=order_r.dtype)], axis=-1)
            sel = order_r[..., None]

            def bias_fn(qi, kj, pos=pos):
                qp, kp = pos[:, :, qi], pos[:, :, kj[0]]
                seen = counts(xp.maximum(qp, 0), xp.maximum(kp, 0))
                with np.errstate(divide="ignore"):
                    return self._bias(xp, qp, kp, causal) - xp.log(xp.maximum(seen, 1)).astype(q.dtype)

            out_s, lse_s = run_block_pattern(xp, gather(q, sel), gather(kn, sel), gather(v, sel),
                                             self.chunk, [(table, me)], bias_fn)
            out, lse = xp.empty_like(out_s), xp.empty_like(lse_s)
            xp.put_along_axis(out, sel, out_s, axis=2)
            xp.put_along_axis(lse, order_r, lse_s, axis=2)
            outs.append(out)
            lses.append(lse)
        lse = xp.stack(lses)
        top = lse.max(axis=0)
        w = xp.exp(lse - top)
        w = w / w.sum(axis=0)
        return sum(w[r][..., None] * outs[r] for r in range(len(outs)))

    def _matrix(self, xp, q, k, causal):
        n = q.shape[2]
        kn, _, chunk_of = self._layout(xp, q)
        nc = -(-n // self.chunk)
        union = 0
        for c in chunk_of:
            union = union | self._neighbours(c[..., :, None], c[..., None, :], nc)
        i = xp.arange(n)
        bias = self._bias(xp, i[:, None], i[None, :], causal) + xp.where(union, 0.0, -np.inf)
        return masked_softmax(xp, scores(q, kn), bias.astype(q.dtype))[0]

    def memory_bytes(self, n, batch, heads, head_dim, itemsize):
        bh = batch * heads
        tile = min(bh * n * 2 * self.chunk, (1 << 22) + bh * 2 * self.chunk ** 2)
        return ((8 + 2 * self.rounds) * bh * n * head_dim * itemsize
                + (4 * itemsize + 8 * (self.rounds + 2)) * tile + 24 * self.rounds * bh * n)
