"""Mixers whose P is (partly) a learned weight: a long convolution (plain long filter, Hyena's
implicit filter), Synthesizer (dense and random) and MLP-Mixer token mixing.

In the template's nomenclature these are the convolution kernel W^c over the sequence and the
learned mixing matrix W. Their weights start from a seeded draw (``initial_weights``); training
binds tensors in their place (``bind``), so one ``_apply`` serves NumPy and torch (see
``portable.py``).

- ``long_conv``: P_ij = w_h[i-j] (j <= i), a free filter per head as long as the sequence
  (``max_len`` taps), applied by FFT in O(N log N) (Fu et al. 2023, "Simple Hardware-Efficient
  Long Convolutions").
- ``hyena``: P_ij = g_i h_h[i-j] g'_j, the filter h = MLP(sin features of the position) times an
  exponential window (implicit: its size does not grow with N), the gates g = sigmoid(q.w),
  g' = sigmoid(k.w') one scalar per head and token (Poli et al. 2023; Hyena's gates are per
  channel: head_dim = 1 recovers them).
- ``synth_dense``: P_i = softmax(relu(q_i W1 + b1) W2 + b2)[:N] (Tay et al. 2021).
- ``synth_random``: P = softmax(R[:N, :N]), R a learned (max_len x max_len) matrix per head.
- ``mlp_mixer``: P = W[:N, :N], a learned token-mixing matrix per head (Tolstikhin et al. 2021's
  token MLP with one layer: its hidden nonlinearity would make P depend on v; the channel MLP
  of the model supplies the nonlinearity).
"""
from __future__ import annotations

import numpy as np

from .base import Mixer, Param, SEED, register
from .portable import check_length, fft_causal_conv, lower, relu, sigmoid, softmax, toeplitz

MAX_LEN = Param(None, "sequence length the position-indexed weights cover (unset: drawn for "
                      "each length; training sets it)", minimum=1, kind=int)


class Learned(Mixer):
    """A mixer with weights: seeded initial values (NumPy), or tensors bound for training."""

    def init_weights(self, rng, heads: int, head_dim: int, length: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def length(self, n: int) -> int:
        """Positions the weights cover for a sequence of ``n`` (``max_len`` when set)."""
        limit = getattr(self, "max_len", None)
        if limit is None:
            return n
        return limit

    def initial_weights(self, heads: int, head_dim: int, length: int = 0) -> dict[str, np.ndarray]:
        key = (heads, head_dim, self.length(length))
        cache = self.__dict__.setdefault("_initial", {})
        if key not in cache:
            cache[key] = self.init_weights(self.rng(*key), *key)
        return cache[key]

    def bind(self, weights: dict | None) -> None:
        """Use these tensors (same names and shapes as ``initial_weights``) instead."""
        self.__dict__["_bound"] = weights

    def w(self, xp, name: str, like):
        bound = self.__dict__.get("_bound")
        if bound is not None:
            self.length(like.shape[2])      # refuses a sequence longer than the bound weights
            return bound[name]
        weights = self.initial_weights(like.shape[1], like.shape[-1], like.shape[2])
        return xp.asarray(weights[name], dtype=like.dtype)


@register
class LongConv(Learned):
    name = "long_conv"
    summary = "long convolution: learned causal filter as long as the sequence, by FFT"
    reference = "Fu et al. 2023, Simple Hardware-Efficient Long Convolutions"
    time_complexity = "O(N log N d)"
    memory_complexity = "O(N d)"
    causal_modes = (True,)
    inputs = "v"
    params = {"max_len": MAX_LEN, "seed": SEED}

    def init_weights(self, rng, heads, head_dim, length):
        lag = np.arange(length)
        rate = np.geomspace(1.0 / length, 0.5, heads)[:, None]   # short and long heads
        filt = rng.standard_normal((heads, length)) * np.exp(-lag * rate) * np.sqrt(rate)
        filt[:, 0] += 1.0
        return {"filter": filt}

    def _filter(self, xp, like):
        return self.w(xp, "filter", like)[:, :like.shape[2]]

    def _apply(self, xp, q, k, v, causal):
        return fft_causal_conv(xp, self._filter(xp, v)[None, :, :, None], v)

    def _matrix(self, xp, q, k, causal):
        return xp.broadcast_to(toeplitz(xp, self._filter(xp, q))[None], q.shape[:2] + (q.shape[2],) * 2)

    def memory_bytes(self, n, batch, heads, head_dim, itemsize):
        return 12 * batch * heads * n * head_dim * itemsize + 2 * heads * self.length(n) * 8


@register
class Hyena(Learned):
    name = "hyena"
    summary = "Hyena: gated long convolution, implicit filter MLP(position) x window, by FFT"
    reference = "Poli et al. 2023, Hyena Hierarchy"
    time_complexity = "O(N log N d + N f)"
    memory_complexity = "O(N (d + f))"
    causal_modes = (True,)
    params = {"features": Param(8, "sin/cos position features of the filter MLP", minimum=2),
              "hidden": Param(32, "filter MLP width f", minimum=1),
              "frequency": Param(8.0, "sine activation frequency of the filter MLP", minimum=0.0),
              "seed": SEED}

    def init_weights(self, rng, heads, head_dim, length):
        z = 1 + 2 * (self.features // 2)
        return {"w1": rng.standard_normal((z, self.hidden)) / np.sqrt(z),
                "b1": rng.uniform(-1, 1, self.hidden),
                "w2": rng.standard_normal((self.hidden, heads)) / np.sqrt(self.hidden),
                "log_rate": np.log(np.geomspace(0.3, 0.003, heads)),
                "gate_q": rng.standard_normal((heads, head_dim)) / np.sqrt(head_dim),
                "gate_k": rng.standard_normal((heads, head_dim)) / np.sqrt(head_dim)}

    def _filter(self, xp, like):
        """(h, n): the implicit filter at lags 0..n-1."""
        n = like.shape[2]
        t = np.arange(n)[:, None] / 1024.0
        f = np.arange(1, self.features // 2 + 1)[None, :]
        z = xp.asarray(np.concatenate([t, np.cos(2 * np.pi * f * t), np.sin(2 * np.pi * f * t)], 1),
                       dtype=like.dtype)
        h = xp.sin(self.frequency * (z @ self.w(xp, "w1", like) + self.w(xp, "b1", like)))
        window = xp.exp(-xp.exp(self.w(xp, "log_rate", like))[:, None]
                        * xp.asarray(np.arange(n), dtype=like.dtype)[None, :])
        return (h @ self.w(xp, "w2", like)).swapaxes(0, 1) * window

    def _gates(self, xp, q, k):
        g = [sigmoid(xp, xp.sum(x * self.w(xp, name, q)[None, :, None, :], axis=-1, keepdims=True))
             for x, name in ((q, "gate_q"), (k, "gate_k"))]
        return g[0], g[1]

    def _apply(self, xp, q, k, v, causal):
        gq, gk = self._gates(xp, q, k)
        return gq * fft_causal_conv(xp, self._filter(xp, v)[None, :, :, None], gk * v)

    def _matrix(self, xp, q, k, causal):
        gq, gk = self._gates(xp, q, k)
        return gq * toeplitz(xp, self._filter(xp, q))[None] * gk.swapaxes(-1, -2)

    def memory_bytes(self, n, batch, heads, head_dim, itemsize):
        return (14 * batch * heads * n * head_dim + 4 * n * (self.hidden + self.features)) * itemsize


class _Synthesized(Learned):
    """P from learned weights, optionally masked causal, O(N^2 d) like attention."""
    time_complexity = "O(N^2 d)"
    memory_complexity = "O(N^2)"

    def _apply(self, xp, q, k, v, causal):
        return self._matrix(xp, q, k, causal) @ v

    def memory_bytes(self, n, batch, heads, head_dim, itemsize):
        return 3 * batch * heads * n * n * itemsize + 2 * batch * heads * n * head_dim * itemsize \
            + heads * self.length(n) ** 2 * (8 + itemsize)


def _masked(xp, logits, causal):
    return xp.where(lower(xp, logits.shape[-1]), logits, -np.inf) if causal else logits


def _square(mixer, xp, name, q):
    """The leading (N, N) block of a (heads, max_len, max_len) weight."""
    n = q.shape[2]
    return mixer.w(xp, name, q)[:, :n, :n]


def _per_batch(xp, p, q):
    return xp.broadcast_to(p[None], q.shape[:2] + p.shape[-2:])


@register
class SynthesizerDense(_Synthesized):
    name = "synth_dense"
    summary = "dense Synthesizer: each token's row of P from an MLP of its query, softmax"
    reference = "Tay et al. 2021, Synthesizer: Rethinking Self-Attention"
    inputs = "qv"
    params = {"max_len": MAX_LEN, "hidden": Param(64, "MLP width", minimum=1), "seed": SEED}

    def init_weights(self, rng, heads, head_dim, length):
        return {"w1": rng.standard_normal((heads, head_dim, self.hidden)) / np.sqrt(head_dim),
                "b1": np.zeros((heads, 1, self.hidden)),
                "w2": rng.standard_normal((heads, self.hidden, length)) / np.sqrt(self.hidden),
                "b2": np.zeros((heads, 1, length))}

    def _matrix(self, xp, q, k, causal):
        n = q.shape[2]
        hidden = relu(xp, q @ self.w(xp, "w1", q)[None] + self.w(xp, "b1", q)[None])
        logits = hidden @ self.w(xp, "w2", q)[None, :, :, :n] + self.w(xp, "b2", q)[None, :, :, :n]
        return softmax(xp, _masked(xp, logits, causal))

    def memory_bytes(self, n, batch, heads, head_dim, itemsize):
        return 4 * batch * heads * n * max(n, self.hidden) * itemsize \
            + heads * self.hidden * self.length(n) * (8 + itemsize)


@register
class SynthesizerRandom(_Synthesized):
    name = "synth_random"
    summary = "random Synthesizer: P = softmax(R), R a learned matrix per head (input-free)"
    reference = "Tay et al. 2021, Synthesizer: Rethinking Self-Attention"
    inputs = "v"
    params = {"max_len": MAX_LEN, "seed": SEED}

    def init_weights(self, rng, heads, head_dim, length):
        return {"logits": rng.standard_normal((heads, length, length))}

    def _matrix(self, xp, q, k, causal):
        return _per_batch(xp, softmax(xp, _masked(xp, _square(self, xp, "logits", q), causal)), q)


@register
class MLPMixer(_Synthesized):
    name = "mlp_mixer"
    summary = "MLP-Mixer token mixing: P = W, a learned N x N matrix per head (masked when causal)"
    reference = "Tolstikhin et al. 2021, MLP-Mixer"
    inputs = "v"
    params = {"max_len": MAX_LEN, "seed": SEED}

    def init_weights(self, rng, heads, head_dim, length):
        rows = np.arange(1, length + 1)[:, None]   # causal row i averages i + 1 tokens
        return {"mixing": rng.standard_normal((heads, length, length)) / np.sqrt(rows)}

    def _matrix(self, xp, q, k, causal):
        w = _square(self, xp, "mixing", q)
        return _per_batch(xp, xp.where(lower(xp, q.shape[2]), w, 0.0) if causal else w, q)
