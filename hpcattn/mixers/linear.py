"""Kernelised (linear) attention: P_ij = phi(q_i).phi(k_j) / sum_l phi(q_i).phi(k_l).

Associativity turns the N x N product into phi(Q) (phi(K)^T V): O(N f d) time, O(f d) state.
The causal form is a prefix sum over j <= i, computed chunkwise (one (f x d) state carried from
chunk to chunk, exact within a chunk) or token by token (the recurrent form); both equal the
masked matrix. The same decayed prefix sum serves RetNet's retention (``retention.py``).

- ``linear``: phi = elu(x) + 1 (Katharopoulos et al. 2020).
- ``performer``: FAVOR+ positive orthogonal random features of the softmax kernel
  (Choromanski et al. 2021), phi(x) = exp(w.x - |x|^2/2) / sqrt(m) on x = q / d^(1/4).
"""
from __future__ import annotations

import numpy as np

from .base import Mixer, Param, SEED, as_xp, register


def decayed_prefix_sum(xp, qf, kf, v, gamma=None, chunk=64):
    """``y_i = sum_{j<=i} gamma^(i-j) (qf_i . kf_j) v_j`` chunkwise; gamma per head (h,) or None (=1).

    qf, kf: (b, h, n, f); v: (b, h, n, e). Memory O(chunk^2 + f e) per (batch, head)."""
    b, h, n, f = qf.shape
    state = xp.zeros((b, h, f, v.shape[-1]), dtype=v.dtype)
    out = xp.empty(v.shape, dtype=v.dtype)
    log_g = None if gamma is None else xp.log(xp.asarray(gamma, dtype=qf.dtype))[:, None, None]
    for s0 in range(0, n, chunk):
        c = min(chunk, n - s0)
        qc, kc, vc = qf[:, :, s0:s0 + c], kf[:, :, s0:s0 + c], v[:, :, s0:s0 + c]
        t = xp.arange(c, dtype=qf.dtype)
        lag = t[:, None] - t[None, :]
        if log_g is None:
            inner = xp.where(lag >= 0, 1.0, 0.0).astype(qf.dtype)
            into, tail, carry = 1.0, 1.0, 1.0
        else:
            inner = xp.where(lag >= 0, xp.exp(xp.maximum(lag, 0) * log_g), 0.0)  # (h, c, c)
            into = xp.exp((t + 1)[:, None] * log_g)        # gamma^(t+1): from the carried state
            tail = xp.exp((c - 1 - t)[:, None] * log_g)    # gamma^(c-1-s): into the next state
            carry = xp.exp(c * log_g)
        out[:, :, s0:s0 + c] = (xp.matmul(xp.matmul(qc, kc.swapaxes(-1, -2)) * inner, vc)
                                + xp.matmul(qc, state) * into)
        state = state * carry + xp.matmul((kc * tail).swapaxes(-1, -2), vc)
    return out


def recurrent_prefix_sum(xp, qf, kf, v, gamma=None):
    """The same sum token by token: S_i = gamma S_{i-1} + kf_i v_i^T, y_i = qf_i S_i."""
    b, h, n, f = qf.shape
    g = 1.0 if gamma is None else xp.asarray(gamma, dtype=qf.dtype)[:, None, None]
    state = xp.zeros((b, h, f, v.shape[-1]), dtype=v.dtype)
    out = xp.empty(v.shape, dtype=v.dtype)
    for i in range(n):
        state = state * g + kf[:, :, i, :, None] * v[:, :, i, None, :]
        out[:, :, i] = xp.matmul(qf[:, :, i, None], state)[:, :, 0]
    return out


def decay_matrix(xp, qf, kf, gamma=None):
    """Naive form: (qf kf^T) * D with D_ij = gamma^(i-j) for j <= i, else 0."""
    n = qf.shape[2]
    i = xp.arange(n, dtype=qf.dtype)
    lag = i[:, None] - i[None, :]
    if gamma is None:
        d = xp.where(lag >= 0, 1.0, 0.0)
    else:
        log_g = xp.log(xp.asarray(gamma, dtype=qf.dtype))[:, None, None]
        d = xp.where(lag >= 0, xp.exp(xp.maximum(lag, 0) * log_g), 0.0)
    return xp.matmul(qf, kf.swapaxes(-1, -2)) * d.astype(qf.dtype)


class _Kernelised(Mixer):
    """Shared algorithm; subclasses give the feature map
    ``feature_map(xp, x, is_query) -> (b,h,n,f)``."""
    forms = ("recurrent",)

    def feature_map(self, xp, x, is_query):
        raise NotImplementedError

    def _augmented(self, xp, q, k, v):
        ones = xp.ones(v.shape[:3] + (1,), dtype=v.dtype)
        return (self.feature_map(xp, q, True), self.feature_map(xp, k, False),
                xp.concatenate([v, ones], axis=-1))

    @staticmethod
    def _normalise(xp, y):
        """numerator / denominator (the appended ones column); 0 where nothing was seen"""
        den = y[..., -1:]
        return y[..., :-1] / xp.where(den == 0, 1, den)

    def _apply(self, xp, q, k, v, causal):
        qf, kf, vv = self._augmented(xp, q, k, v)
        if causal:
            return self._normalise(xp, decayed_prefix_sum(xp, qf, kf, vv, None, self.chunk))
        return self._normalise(xp, qf @ (kf.swapaxes(-1, -2) @ vv))

    def _recurrent(self, xp, q, k, v, causal):
        return self._normalise(xp, recurrent_prefix_sum(xp, *self._augmented(xp, q, k, v)))

    def _matrix(self, xp, q, k, causal):
        qf, kf = self.feature_map(xp, q, True), self.feature_map(xp, k, False)
        a = decay_matrix(xp, qf, kf) if causal else qf @ kf.swapaxes(-1, -2)
        return self._normalise(xp, xp.concatenate([a, a.sum(axis=-1, keepdims=True)], axis=-1))

    def n_features(self, head_dim):
        return head_dim

    def memory_bytes(self, n, batch, heads, head_dim, itemsize):
        f = self.n_features(head_dim)
        bh = batch * heads
        return (6 * bh * n * f + 2 * bh * n * (head_dim + 1) + 3 * bh * self.chunk ** 2
                + 2 * bh * f * (head_dim + 1)) * itemsize


@register
class LinearAttention(_Kernelised):
    name = "linear"
    summary = "linear attention, phi(x) = elu(x) + 1 kernel; causal by prefix sums"
    reference = "Katharopoulos et al. 2020, Transformers are RNNs"
    time_complexity = "O(N d^2)"
    memory_complexity = "O(N d + d^2)"
    params = {"chunk": Param(64, "chunk length of the causal prefix sum", minimum=1)}

    def feature_map(self, xp, x, is_query):
        return xp.where(x > 0, x + 1, xp.exp(xp.minimum(x, 0)))


@register
class Performer(_Kernelised):
    name = "performer"
    summary = "FAVOR+: positive orthogonal random features of the softmax kernel"
    reference = "Choromanski et al. 2021, Rethinking Attention with Performers"
    time_complexity = "O(N m d)"
    memory_complexity = "O(N m + m d)"
    params = {"features": Param(256, "random features m", minimum=1),
              "eps": Param(0.0, "added to every feature, in unshifted units", minimum=0.0),
              "chunk": Param(64, "chunk length of the causal prefix sum", minimum=1),
              "seed": SEED}

    def n_features(self, head_dim):
        return self.features

    def projection(self, heads, d):
        """(heads, m, d) orthogonal Gaussian rows: QR blocks, row norms drawn from chi(d)."""
        cache = self.__dict__.setdefault("_projections", {})
        if (heads, d) not in cache:
            cache[heads, d] = self._draw_projection(heads, d)
        return cache[heads, d]

    def _draw_projection(self, heads, d):
        rng = self.rng(heads, d)
        out = np.empty((heads, self.features, d))
        for h in range(heads):
            blocks = [np.linalg.qr(rng.standard_normal((d, d)))[0].T
                      for _ in range(-(-self.features // d))]
            rows = np.concatenate(blocks)[:self.features]
            out[h] = rows * np.linalg.norm(rng.standard_normal((self.features, d)), axis=1)[:, None]
        return out

    def feature_map(self, xp, x, is_query):
        d = x.shape[-1]
        x = x * d ** -0.25
        w = as_xp(xp, self.projection(x.shape[1], d), x)
        wx = xp.matmul(x, w.swapaxes(-1, -2)[None])                 # (b, h, n, m)
        # constant factors cancel in P: one per query row, one per (batch, head) over all keys.
        # eps scales with them (the reference code adds it after the shift, which lets a future
        # key change a causal P)
        # (|x|^2/2 is inside the shifted exponent so large queries do not underflow to zero)
        a = wx - 0.5 * (x * x).sum(axis=-1, keepdims=True)
        shift = a.max(axis=-1, keepdims=True) if is_query else a.max(axis=(-1, -2), keepdims=True)
        phi = xp.exp(a - shift)
        if self.eps:
            phi += self.eps * xp.exp(-shift)
        return phi / np.sqrt(self.features)
