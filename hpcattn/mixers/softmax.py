"""Exact softmax attention, twice: blockwise (the spine's online-softmax kernel, O(N d) memory)
and naive (the materialised N x N score matrix, the memory wall every other mixer avoids).
P = softmax(Q K^T / sqrt(d)) (+ causal mask)."""
from __future__ import annotations

from .. import backend
from .base import Mixer, Param, causal_bias, masked_softmax, register, scores


def softmax_matrix(xp, q, k, causal, scale=None):
    """The textbook dense P for head-major q/k (b, h, n, d)."""
    bias = causal_bias(q.shape[2], xp, q.dtype) if causal else None
    return masked_softmax(xp, scores(q, k, scale), bias)[0]


class _Softmax(Mixer):
    summary = "P = softmax(Q K^T / sqrt(d)), exact"
    reference = "Vaswani et al. 2017, Attention Is All You Need"
    exact = True

    def _matrix(self, xp, q, k, causal):
        return softmax_matrix(xp, q, k, causal)


@register
class ExactBlockwise(_Softmax):
    name = "exact_blockwise"
    summary = "exact softmax attention, online softmax over key tiles (FlashAttention-style)"
    time_complexity = "O(N^2 d)"
    memory_complexity = "O(N d + Bq Bk)"
    params = {"block_q": Param(256, "query rows per tile", minimum=1),
              "block_k": Param(512, "key rows per tile", minimum=1)}

    def _apply(self, xp, q, k, v, causal):
        out, _ = backend.attention(xp.moveaxis(q, 1, 2), xp.moveaxis(k, 1, 2), xp.moveaxis(v, 1, 2),
                                   causal=causal, block_q=self.block_q, block_k=self.block_k,
                                   check_finite=False)
        return xp.moveaxis(out, 2, 1)

    def memory_bytes(self, n, batch, heads, head_dim, itemsize):
        tile = batch * heads * min(n, self.block_q) * min(n, self.block_k) * itemsize
        return 5 * batch * heads * n * head_dim * itemsize + 3 * tile


@register
class ExactNaive(_Softmax):
    name = "exact_naive"
    summary = "exact softmax attention with the materialised N x N score matrix"
    time_complexity = "O(N^2 d)"
    memory_complexity = "O(N^2)"

    def _apply(self, xp, q, k, v, causal):
        return softmax_matrix(xp, q, k, causal) @ v

    def memory_bytes(self, n, batch, heads, head_dim, itemsize):
        return 3 * batch * heads * n * n * itemsize // 2 + 2 * batch * heads * n * head_dim * itemsize
