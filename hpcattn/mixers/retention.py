"""RetNet retention: P_ij = gamma_h^(i-j) (R_i q_i).(R_j k_j) / sqrt(d) for j <= i, else 0.

A decaying linear recurrence with one decay rate per head (gamma_h = 1 - 2^(-5-h)) and a
rotary (xPos-style, without its length extrapolation scale) position rotation R_i. Three forms
that agree: parallel (the matrix), recurrent (one (d x d) state per head), chunkwise (the
default apply: exact inside chunks, the state carries across them). Retention is causal only.
The group norm and the stabilising row normalisations of the RetNet code are per-row scalings
outside the mixing matrix and are left to the caller.
"""
from __future__ import annotations

import numpy as np

from .base import Mixer, Param, as_xp, register, scale_of
from .linear import decay_matrix, decayed_prefix_sum, recurrent_prefix_sum


def rotate(xp, x, base=10000.0):
    """Rotary position rotation of head-major x (b, h, n, d): pairs (2i, 2i+1) turn by n*theta_i."""
    n, d = x.shape[2], x.shape[3]
    half = d // 2
    theta = 1.0 / base ** np.linspace(0, 1, half) if half else np.zeros(0)
    angle = as_xp(xp, np.arange(n)[:, None] * theta[None, :], x)             # (n, half)
    cos, sin = xp.cos(angle), xp.sin(angle)
    even, odd = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
    out = x.copy()
    out[..., 0:2 * half:2] = even * cos - odd * sin
    out[..., 1:2 * half:2] = even * sin + odd * cos
    return out


@register
class Retention(Mixer):
    name = "retnet"
    summary = "retention: decaying causal recurrence gamma^(i-j) q_i.k_j, one gamma per head"
    reference = "Sun et al. 2023, Retentive Network (RetNet)"
    time_complexity = "O(N c d + N d^2)"
    memory_complexity = "O(N c + d^2)"
    causal_modes = (True,)
    forms = ("recurrent", "parallel")
    params = {"chunk": Param(64, "chunk length c of the chunkwise form", minimum=1),
              "rotary": Param(True, "rotate q/k by position (xPos/rotary)")}

    @staticmethod
    def gammas(heads):
        return 1.0 - 2.0 ** (-5.0 - np.arange(heads))

    def _qk(self, xp, q, k):
        if self.rotary:
            q, k = rotate(xp, q), rotate(xp, k)
        return q * scale_of(q.shape[-1]), k

    def _apply(self, xp, q, k, v, causal):
        return decayed_prefix_sum(xp, *self._qk(xp, q, k), v, self.gammas(q.shape[1]), self.chunk)

    def _recurrent(self, xp, q, k, v, causal):
        return recurrent_prefix_sum(xp, *self._qk(xp, q, k), v, self.gammas(q.shape[1]))

    def _parallel(self, xp, q, k, v, causal):
        return self._matrix(xp, q, k, causal) @ v

    def _matrix(self, xp, q, k, causal):
        return decay_matrix(xp, *self._qk(xp, q, k), self.gammas(q.shape[1]))

    def memory_bytes(self, n, batch, heads, head_dim, itemsize):
        bh = batch * heads
        return (6 * bh * n * head_dim + 3 * bh * self.chunk ** 2 + 2 * bh * head_dim ** 2) * itemsize
