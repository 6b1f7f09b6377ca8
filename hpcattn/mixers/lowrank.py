"""Low-rank mixers: P is a product through r << N intermediate points.

- ``linformer``: keys and values projected along the sequence by random (Johnson-Lindenstrauss)
  matrices E, F (r x N): P = softmax(Q (E K)^T / sqrt(d)) F (Wang et al. 2020).
- ``nystrom``: Nystrom approximation of softmax attention from m segment-mean landmarks:
  P = softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T), with the Moore-Penrose inverse by
  the paper's iterative (Razavi et al.) method (Xiong et al. 2021).
Both are non-causal, as in their papers.
"""
from __future__ import annotations

import numpy as np

from .base import Mixer, Param, SEED, as_xp, masked_softmax, register, scores


def _softmax(xp, s):
    return masked_softmax(xp, s)[0]


@register
class Linformer(Mixer):
    name = "linformer"
    summary = "keys/values projected along the sequence to rank r: softmax(Q (EK)^T) F V"
    reference = "Wang et al. 2020, Linformer: Self-Attention with Linear Complexity"
    time_complexity = "O(N r d)"
    memory_complexity = "O(N r)"
    causal_modes = (False,)
    params = {"rank": Param(128, "projected length r", minimum=1),
              "share_kv": Param(False, "one projection for keys and values (E = F)"),
              "seed": SEED}

    def projections(self, xp, n, like):
        """E, F of shape (r, n), entries N(0, 1/r), one pair shared by all heads."""
        rng = self.rng(n)
        e = rng.standard_normal((self.rank, n)) / np.sqrt(self.rank)
        f = e if self.share_kv else rng.standard_normal((self.rank, n)) / np.sqrt(self.rank)
        return as_xp(xp, e, like), as_xp(xp, f, like)

    def _weights(self, xp, q, k):
        e, f = self.projections(xp, q.shape[2], q)
        return _softmax(xp, scores(q, e @ k)), f

    def _apply(self, xp, q, k, v, causal):
        p, f = self._weights(xp, q, k)
        return p @ (f @ v)

    def _matrix(self, xp, q, k, causal):
        p, f = self._weights(xp, q, k)
        return p @ f

    def memory_bytes(self, n, batch, heads, head_dim, itemsize):
        bh = batch * heads
        return (3 * bh * n * self.rank + 2 * self.rank * n + 3 * bh * n * head_dim) * itemsize


def segment_means(xp, x, m):
    """Means of m near-equal consecutive segments of head-major x along the sequence."""
    n = x.shape[2]
    bounds = (np.arange(m + 1) * n) // m
    zero = xp.zeros(x.shape[:2] + (1,) + x.shape[3:], dtype=x.dtype)
    cs = xp.concatenate([zero, xp.cumsum(x, axis=2)], axis=2)
    lengths = as_xp(xp, np.diff(bounds), x)[:, None]
    return (cs[:, :, bounds[1:]] - cs[:, :, bounds[:-1]]) / lengths


def iterative_pinv(xp, a, iterations):
    """Moore-Penrose inverse of each (m x m) matrix in ``a`` by the cubic Newton-type iteration
    Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4, from Z0 = A^T / (||A||_1 ||A||_inf)."""
    eye = xp.eye(a.shape[-1], dtype=a.dtype)
    norm1 = xp.abs(a).sum(axis=-2).max(axis=-1)[..., None, None]
    norm_inf = xp.abs(a).sum(axis=-1).max(axis=-1)[..., None, None]
    z = a.swapaxes(-1, -2) / (norm1 * norm_inf)
    for _ in range(iterations):
        az = xp.matmul(a, z)
        z = 0.25 * xp.matmul(z, 13 * eye - xp.matmul(az, 15 * eye - xp.matmul(az, 7 * eye - az)))
    return z


@register
class Nystrom(Mixer):
    name = "nystrom"
    summary = "Nystrom softmax from m segment-mean landmarks, iterative pseudo-inverse"
    reference = "Xiong et al. 2021, Nystromformer"
    time_complexity = "O(N m d + m^3)"
    memory_complexity = "O(N m)"
    causal_modes = (False,)
    params = {"landmarks": Param(64, "landmarks m (capped at N)", minimum=1),
              "pinv_iterations": Param(6, "iterations of the pseudo-inverse", minimum=0)}

    def _kernels(self, xp, q, k):
        c = q.shape[-1] ** -0.25
        q, k = q * c, k * c
        m = min(self.landmarks, q.shape[2])
        ql, kl = segment_means(xp, q, m), segment_means(xp, k, m)
        left = _softmax(xp, q @ kl.swapaxes(-1, -2))
        middle = iterative_pinv(xp, _softmax(xp, ql @ kl.swapaxes(-1, -2)), self.pinv_iterations)
        right = _softmax(xp, ql @ k.swapaxes(-1, -2))
        return left, middle, right

    def _apply(self, xp, q, k, v, causal):
        left, middle, right = self._kernels(xp, q, k)
        return left @ (middle @ (right @ v))

    def _matrix(self, xp, q, k, causal):
        left, middle, right = self._kernels(xp, q, k)
        return (left @ middle) @ right

    def memory_bytes(self, n, batch, heads, head_dim, itemsize):
        bh = batch * heads
        m = min(self.landmarks, n)
        return (3 * bh * n * m + 2 * bh * n * head_dim + 8 * bh * m * m) * itemsize
