"""Array functions the trainable mixers share, written once for NumPy, CuPy and PyTorch.

The trainable mixers (``learned.py``, ``gated.py``) use only what the three namespaces spell the
same way: ``xp.exp``, ``xp.where``, ``xp.cumsum(x, axis=)``, ``xp.concatenate(.., axis=)``,
``xp.fft.rfft(x, n, axis=)``, ``xp.linalg.solve``, ``@``, ``.swapaxes`` and slicing; no
``.astype``, no ``out=``, no in-place updates (autograd records every step). The few functions
they spell differently (a max that returns values only, the stable sigmoid family) live here.
So the same ``_apply`` runs in the NumPy tests and under ``torch.autograd`` in training.
"""
from __future__ import annotations

import numpy as np

from ..errors import HpcattnError


def rowmax(xp, s):
    """max over the last axis, keepdims (torch's ``max`` returns (values, indices))."""
    return xp.amax(s, axis=-1, keepdims=True)


def softmax(xp, s):
    """Row softmax of ``s``; -inf entries get weight 0 (every row keeps one finite entry)."""
    e = xp.exp(s - rowmax(xp, s))
    return e / xp.sum(e, axis=-1, keepdims=True)


def relu(xp, x):
    return xp.where(x > 0, x, 0.0)


def softplus(xp, x):
    """log(1 + e^x) without overflow."""
    return xp.log1p(xp.exp(-xp.abs(x))) + relu(xp, x)


def logsigmoid(xp, x):
    return -softplus(xp, -x)


def sigmoid(xp, x):
    return xp.exp(logsigmoid(xp, x))


def lower(xp, n, strict=False):
    """(n, n) boolean mask: j <= i (or j < i)."""
    i = xp.arange(n)
    return i[:, None] > i[None, :] if strict else i[:, None] >= i[None, :]


def fft_causal_conv(xp, filt, v):
    """``y_i = sum_{j<=i} filt_(i-j) v_j`` along axis 2 by FFT (zero-padded to 2n: no wrap)."""
    n = v.shape[2]
    size = 2 * n
    return xp.fft.irfft(xp.fft.rfft(filt, size, axis=2) * xp.fft.rfft(v, size, axis=2),
                        size, axis=2)[:, :, :n]


def toeplitz(xp, filt):
    """(h, n, n) lower-triangular Toeplitz matrix T_ij = filt[h, i-j] (j <= i) of filt (h, n)."""
    n = filt.shape[-1]
    i = np.arange(n)
    lag = np.maximum(i[:, None] - i[None, :], 0)
    return xp.where(lower(xp, n), filt[:, lag], 0.0)


def check_length(mixer, n: int) -> None:
    """Position-indexed weights exist for ``max_len`` tokens only."""
    if n > mixer.max_len:
        raise HpcattnError(f"mixer {mixer.name} has weights for max_len={mixer.max_len} tokens; "
                           f"got seq_len {n}; expected a larger max_len")
