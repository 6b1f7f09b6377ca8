"""S4D diagonal state-space mixer (Gu et al. 2022, "On the Parameterization and Initialization
of Diagonal State Space Models"), S4D-Lin initialisation, zero-order-hold discretisation.

Per head h: x_t = A_bar x_{t-1} + B_bar u_t, y_t = 2 Re(C x_t) + D u_t with a diagonal complex
A (state/2 modes, conjugate pairs folded into the factor 2). Unrolled, y = K * u + D u with the
kernel K_l = 2 Re(sum_n C_n B_bar_n A_bar_n^l): P is lower-triangular Toeplitz, P_ij = K_(i-j)
(+ D on the diagonal). apply convolves with the FFT (O(N log N)); the recurrent form runs the
state. S4 keeps one SSM per channel; here each head holds one SSM shared by its head_dim
channels (head_dim = 1 gives the per-channel layout). Causal by construction.
"""
from __future__ import annotations

import numpy as np

from .base import Mixer, Param, SEED, as_xp, register


@register
class S4D(Mixer):
    name = "s4d"
    summary = "diagonal SSM long convolution, P Toeplitz with kernel 2Re(C B A^l); FFT or recurrent"
    reference = "Gu et al. 2022, S4D (diagonal state spaces)"
    time_complexity = "O(N log N d + N s)"
    memory_complexity = "O(N (d + s))"
    causal_modes = (True,)
    inputs = "v"
    forms = ("recurrent",)
    params = {"state": Param(64, "state size s (s/2 complex modes)", minimum=2),
              "dt_min": Param(1e-3, "smallest step (log-uniform draw per head)", minimum=0.0),
              "dt_max": Param(1e-1, "largest step", minimum=0.0),
              "seed": SEED}

    def ssm(self, heads):
        """Discrete (A_bar, B_bar * C, D) per head: complex (h, s/2), complex (h, s/2), real (h,)."""
        modes = self.state // 2
        rng = self.rng(heads, modes)
        a = -0.5 + 1j * np.pi * np.arange(modes)                            # S4D-Lin
        c = (rng.standard_normal((heads, modes)) + 1j * rng.standard_normal((heads, modes))) / np.sqrt(2)
        dt = np.exp(rng.uniform(np.log(self.dt_min), np.log(self.dt_max), heads))[:, None]
        a_bar = np.exp(dt * a)
        b_bar = (a_bar - 1) / a                                             # ZOH with B = 1
        return a_bar, b_bar * c, rng.standard_normal(heads)

    def kernel(self, n, heads):
        a_bar, bc, _ = self.ssm(heads)
        powers = np.exp(np.log(a_bar)[:, :, None] * np.arange(n))            # (h, modes, n)
        return 2 * np.einsum("hm,hmn->hn", bc, powers).real

    def _apply(self, xp, q, k, v, causal):
        n = v.shape[2]
        kern = as_xp(xp, self.kernel(n, v.shape[1]), v)[None, :, :, None]   # (1, h, n, 1)
        d = as_xp(xp, self.ssm(v.shape[1])[2], v)[None, :, None, None]
        size = 2 * n
        y = xp.fft.irfft(xp.fft.rfft(kern, size, axis=2) * xp.fft.rfft(v, size, axis=2), size, axis=2)
        return y[:, :, :n] + d * v

    def _recurrent(self, xp, q, k, v, causal):
        a_bar, bc, d = (xp.asarray(x) for x in self.ssm(v.shape[1]))
        state = xp.zeros(v.shape[:2] + (a_bar.shape[1], v.shape[3]), dtype=np.complex128)
        out = xp.empty(v.shape, dtype=v.dtype)
        for t in range(v.shape[2]):
            state = state * a_bar[None, :, :, None] + v[:, :, t, None, :]
            out[:, :, t] = 2 * (bc[None, :, :, None] * state).sum(axis=2).real \
                + d[None, :, None] * v[:, :, t]
        return out

    def _matrix(self, xp, q, k, causal):
        n, h = q.shape[2], q.shape[1]
        kern = self.kernel(n, h)
        i = np.arange(n)
        lag = i[:, None] - i[None, :]
        p = np.where(lag >= 0, kern[:, np.maximum(lag, 0)], 0.0) + self.ssm(h)[2][:, None, None] * np.eye(n)
        return xp.broadcast_to(as_xp(xp, p, q), q.shape[:2] + (n, n))

    def memory_bytes(self, n, batch, heads, head_dim, itemsize):
        return 10 * batch * heads * n * head_dim * itemsize + 16 * heads * self.state * n
