"""Input-dependent recurrences: a selective state space (Mamba-style), gated linear attention
(GLA) and DeltaNet (the delta rule). All causal; each has a chunked form (apply), a token-by-token
recurrent form (the naive reference) and the explicit P for the given input.

- ``mamba``: h_t = exp(D_t A) h_{t-1} + D_t B_t v_t^T, y_t = C_t h_t + D v_t with B_t = k_t,
  C_t = q_t and the step D_t = softplus(k_t.w + b) per head and token (input-dependent Delta,
  B, C; one decay rate A per head as in Mamba-2's SSD). P_ij = D_j (q_i.k_j) exp(A sum_{j<l<=i} D_l)
  (+ D on the diagonal). Forms: chunked (SSD), ``scan`` (Hillis-Steele parallel scan over the
  states, log2 N steps), ``recurrent``. (Gu & Dao 2023; Dao & Gu 2024.)
- ``gla``: S_t = diag(a_t) S_{t-1} + k_t v_t^T, y_t = q_t S_t / sqrt(d) with a per-key-dimension
  gate a_t = max(sigmoid(k_t W + b)^(1/16), e^-1) (Yang et al. 2024, Gated Linear Attention; the
  floor keeps the chunked form's factored decays finite).
- ``deltanet``: S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T with L2-normalised q, k and
  beta_t = sigmoid(k_t.w + b): the state is corrected toward each new value (Schlag et al. 2021;
  the chunked form is Yang et al. 2024's WY/UT transform: one small triangular solve per chunk).
  Still linear in v for given q, k, so P exists: P = tril(Q K^T) (I + tril(diag(beta) K K^T, -1))^-1 diag(beta).
"""
from __future__ import annotations

import numpy as np

from ..errors import HpcattnError
from .base import Param, SEED, register
from .learned import Learned
from .portable import logsigmoid, lower, sigmoid, softplus

CHUNK = Param(64, "chunk length of the chunked form", minimum=1)


def _chunks(n, chunk):
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def gated_prefix_sum(xp, q, k, log_g, v, chunk):
    """``y_i = sum_{j<=i} sum_c q_ic k_jc exp(L_ic - L_jc) v_j``, L = cumsum of ``log_g`` (<= 0),
    chunkwise, a (d x e) state across chunks. ``log_g`` is (b, h, n, 1) (one gate per head:
    pairwise decays inside a chunk, every exponent <= 0 whatever the gates) or (b, h, n, d) (per
    key dimension: the factored form, which needs the chunk's summed log gate >= -MAX_DECAY)."""
    b, h, n, d = q.shape
    state = xp.zeros((b, h, d, v.shape[-1]), dtype=v.dtype)
    outs = []
    for s0, s1 in _chunks(n, chunk):
        qc, kc, vc = q[:, :, s0:s1], k[:, :, s0:s1], v[:, :, s0:s1]
        cum = xp.cumsum(log_g[:, :, s0:s1], axis=2)
        if log_g.shape[-1] == 1:
            decay = xp.exp(xp.where(lower(xp, s1 - s0), cum - cum.swapaxes(-1, -2), -np.inf))
            a = (qc @ kc.swapaxes(-1, -2)) * decay
        else:   # factored (FLA's form): e^-cum <= e^(MAX_DECAY): see GLA's gate floor
            a = xp.where(lower(xp, s1 - s0), (qc * xp.exp(cum)) @ (kc * xp.exp(-cum)).swapaxes(-1, -2), 0.0)
        outs.append(a @ vc + (qc * xp.exp(cum)) @ state)
        last = cum[:, :, -1:, :]
        state = (xp.exp(last[:, :, 0, :])[..., None] * state
                 + (kc * xp.exp(last - cum)).swapaxes(-1, -2) @ vc)
    return xp.concatenate(outs, axis=2)


def gated_recurrent(xp, q, k, log_g, v):
    """The same token by token: S_t = exp(log_g_t) S_{t-1} + k_t v_t^T, y_t = q_t S_t."""
    state = xp.zeros(q.shape[:2] + (q.shape[-1], v.shape[-1]), dtype=v.dtype)
    outs = []
    for t in range(q.shape[2]):
        state = (xp.exp(log_g[:, :, t])[..., None] * state
                 + k[:, :, t, :, None] * v[:, :, t, None, :])
        outs.append(q[:, :, t, None, :] @ state)
    return xp.concatenate(outs, axis=2)


def gated_scan(xp, q, k, log_g, v):
    """Hillis-Steele inclusive scan of h_t = a_t h_{t-1} + b_t over all states at once:
    log2(N) steps, each pairing every t with t - 2^s (the parallel form; O(N d e log N) work)."""
    a = xp.exp(log_g)[..., None]                       # (b, h, n, d|1, 1)
    s = k[..., :, None] * v[..., None, :]              # (b, h, n, d, e)
    step = 1
    while step < q.shape[2]:
        pad_s = xp.zeros(s.shape[:2] + (step,) + s.shape[3:], dtype=s.dtype)
        pad_a = xp.ones(a.shape[:2] + (step,) + a.shape[3:], dtype=a.dtype)
        s = s + a * xp.concatenate([pad_s, s[:, :, :-step]], axis=2)
        a = a * xp.concatenate([pad_a, a[:, :, :-step]], axis=2)
        step *= 2
    return (q[..., None, :] @ s)[..., 0, :]


def gated_matrix(xp, q, k, log_g):
    """Naive P: P_ij = sum_c q_ic k_jc exp(L_ic - L_jc) for j <= i."""
    cum = xp.cumsum(log_g, axis=2)
    decay = xp.exp(xp.where(lower(xp, q.shape[2])[:, :, None],
                            cum[:, :, :, None, :] - cum[:, :, None, :, :], -np.inf))
    return xp.sum(q[:, :, :, None, :] * k[:, :, None, :, :] * decay, axis=-1)


MAX_DECAY = 64.0   # e^64 * |q| |k| stays far inside float32's range (e^88)


class _Gated(Learned):
    causal_modes = (True,)

    def _inputs(self, xp, q, k):
        """(q, k, log_g) of the gated recurrence."""
        raise NotImplementedError

    def _skip(self, xp, q):
        return None

    def _finish(self, xp, y, v):
        skip = self._skip(xp, v)
        return y if skip is None else y + skip[None, :, None, None] * v

    def _apply(self, xp, q, k, v, causal):
        return self._finish(xp, gated_prefix_sum(xp, *self._inputs(xp, q, k), v, self.chunk), v)

    def _recurrent(self, xp, q, k, v, causal):
        return self._finish(xp, gated_recurrent(xp, *self._inputs(xp, q, k), v), v)

    def _matrix(self, xp, q, k, causal):
        p = gated_matrix(xp, *self._inputs(xp, q, k))
        skip = self._skip(xp, q)
        return p if skip is None else p + skip[None, :, None, None] * xp.eye(q.shape[2], dtype=q.dtype)

    def memory_bytes(self, n, batch, heads, head_dim, itemsize):
        c = min(n, self.chunk)
        return (3 * batch * heads * n * head_dim + 3 * batch * heads * c * c
                + 3 * batch * heads * head_dim ** 2) * itemsize


@register
class Mamba(_Gated):
    name = "mamba"
    summary = "selective SSM: input-dependent step, B = k, C = q; decay exp(step A) per head"
    reference = "Gu & Dao 2023, Mamba; Dao & Gu 2024, Mamba-2 (SSD)"
    time_complexity = "O(N c d + N d^2)"
    memory_complexity = "O(N d + c^2 + d^2)"
    forms = ("recurrent", "scan")
    params = {"chunk": CHUNK, "dt_min": Param(1e-3, "smallest initial step", minimum=1e-9),
              "dt_max": Param(1e-1, "largest initial step", minimum=1e-9), "seed": SEED}

    def init_weights(self, rng, heads, head_dim, length):
        dt = np.exp(rng.uniform(np.log(self.dt_min), np.log(self.dt_max), heads))
        return {"dt_w": rng.standard_normal((heads, head_dim)) / np.sqrt(head_dim),
                "dt_bias": dt + np.log(-np.expm1(-dt)),          # softplus^-1(dt)
                "log_a": np.log(np.arange(1, heads + 1, dtype=float)),
                "skip": np.ones(heads)}

    def _inputs(self, xp, q, k):
        step = softplus(xp, xp.sum(k * self.w(xp, "dt_w", k)[None, :, None, :], axis=-1, keepdims=True)
                        + self.w(xp, "dt_bias", k)[None, :, None, None])
        a = -xp.exp(self.w(xp, "log_a", k))[None, :, None, None]
        return q, k * step, step * a

    def _skip(self, xp, like):
        return self.w(xp, "skip", like)

    def _scan(self, xp, q, k, v, causal):
        return self._finish(xp, gated_scan(xp, *self._inputs(xp, q, k), v), v)


@register
class GLA(_Gated):
    name = "gla"
    summary = "gated linear attention: state decays per key dimension by an input gate"
    reference = "Yang et al. 2024, Gated Linear Attention Transformers"
    time_complexity = "O(N c d^2 + N d^2)"
    memory_complexity = "O(N d + c^2 + d^2)"
    forms = ("recurrent",)
    params = {"chunk": CHUNK, "temperature": Param(16.0, "gate = sigmoid(.)^(1/temperature)",
                                                   minimum=1e-6), "seed": SEED}

    def init_weights(self, rng, heads, head_dim, length):
        return {"gate_w": rng.standard_normal((heads, head_dim, head_dim)) / np.sqrt(head_dim),
                "gate_b": np.zeros((heads, 1, head_dim))}

    def __init__(self, **params):
        super().__init__(**params)
        if self.chunk > MAX_DECAY:
            raise HpcattnError(f"gla chunk={self.chunk} is too long for its factored chunk form; "
                               f"expected chunk <= {MAX_DECAY:g}")

    def _inputs(self, xp, q, k):
        """The log gate is floored at -1 per token (binding only for gate logits below about
        -temperature), so a chunk of <= MAX_DECAY tokens decays by at most e^-MAX_DECAY."""
        logits = k @ self.w(xp, "gate_w", k)[None] + self.w(xp, "gate_b", k)[None]
        log_g = logsigmoid(xp, logits) / self.temperature
        return q * q.shape[-1] ** -0.5, k, xp.where(log_g > -1.0, log_g, -1.0)


class _Delta:
    """The delta rule's forms, on normalised q, k and per-token beta (b, h, n)."""

    @staticmethod
    def chunked(xp, q, k, beta, v, chunk):
        b, h, n, d = q.shape
        state = xp.zeros((b, h, d, v.shape[-1]), dtype=v.dtype)
        outs = []
        for s0, s1 in _chunks(n, chunk):
            qc, kc, vc, bc = q[:, :, s0:s1], k[:, :, s0:s1], v[:, :, s0:s1], beta[:, :, s0:s1]
            eye = xp.eye(s1 - s0, dtype=q.dtype)
            t = _Delta.transform(xp, kc, bc, eye)
            u = t @ (vc - kc @ state)
            outs.append(qc @ state + xp.where(lower(xp, s1 - s0), qc @ kc.swapaxes(-1, -2), 0.0) @ u)
            state = state + kc.swapaxes(-1, -2) @ u
        return xp.concatenate(outs, axis=2)

    @staticmethod
    def transform(xp, k, beta, eye):
        """T = (I + tril(diag(beta) K K^T, -1))^-1 diag(beta): u = T (v - K S_0)."""
        a = xp.where(lower(xp, k.shape[2], strict=True), (k @ k.swapaxes(-1, -2)) * beta[..., None], 0.0)
        return xp.linalg.solve(eye + a, eye * beta[..., None, :])

    @staticmethod
    def recurrent(xp, q, k, beta, v):
        state = xp.zeros(q.shape[:2] + (q.shape[-1], v.shape[-1]), dtype=v.dtype)
        outs = []
        for t in range(q.shape[2]):
            kt = k[:, :, t]
            u = beta[:, :, t, None] * (v[:, :, t] - (kt[:, :, None, :] @ state)[:, :, 0])
            state = state + kt[..., :, None] * u[..., None, :]
            outs.append(q[:, :, t, None, :] @ state)
        return xp.concatenate(outs, axis=2)


@register
class DeltaNet(Learned):
    name = "deltanet"
    summary = "DeltaNet: linear attention whose state is corrected by the delta rule"
    reference = "Schlag et al. 2021; Yang et al. 2024, Parallelizing Linear Transformers with the Delta Rule"
    time_complexity = "O(N c d + N d^2 + N c^2)"
    memory_complexity = "O(N d + c^2 + d^2)"
    causal_modes = (True,)
    forms = ("recurrent",)
    params = {"chunk": CHUNK, "seed": SEED}

    def init_weights(self, rng, heads, head_dim, length):
        return {"beta_w": rng.standard_normal((heads, head_dim)) / np.sqrt(head_dim),
                "beta_b": np.zeros(heads)}

    def _inputs(self, xp, q, k):
        beta = sigmoid(xp, xp.sum(k * self.w(xp, "beta_w", k)[None, :, None, :], axis=-1)
                       + self.w(xp, "beta_b", k)[None, :, None])

        def unit(x):
            return x / xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True) + 1e-6)
        return unit(q), unit(k), beta

    def _apply(self, xp, q, k, v, causal):
        qn, kn, beta = self._inputs(xp, q, k)
        return _Delta.chunked(xp, qn, kn, beta, v, self.chunk)

    def _recurrent(self, xp, q, k, v, causal):
        return _Delta.recurrent(xp, *self._inputs(xp, q, k), v)

    def _matrix(self, xp, q, k, causal):
        qn, kn, beta = self._inputs(xp, q, k)
        t = _Delta.transform(xp, kn, beta, xp.eye(q.shape[2], dtype=q.dtype))
        return xp.where(lower(xp, q.shape[2]), qn @ kn.swapaxes(-1, -2), 0.0) @ t

    def memory_bytes(self, n, batch, heads, head_dim, itemsize):
        c = min(n, self.chunk)
        return (4 * batch * heads * n * head_dim + 6 * batch * heads * c * c
                + 3 * batch * heads * head_dim ** 2) * itemsize
