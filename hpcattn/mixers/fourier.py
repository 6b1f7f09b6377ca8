"""FNet Fourier mixing (Lee-Thorp et al. 2022): y = Re(FFT_seq(FFT_hidden(x))).

In the template: the hidden-dimension FFT is a per-token map of the values, the sequence FFT is
the mixing matrix P = the DFT (Vandermonde) matrix F_jk = exp(-2 pi i jk / N), and the output
is the real part. No parameters are learnt and no q/k are used. ``norm="ortho"`` scales both
FFTs to be unitary (the paper's unscaled FFT relies on the LayerNorm that follows it).
"""
from __future__ import annotations

import numpy as np

from .base import Mixer, Param, register


@register
class FNet(Mixer):
    name = "fnet"
    summary = "Fourier mixing: real part of the 2-D DFT over sequence and hidden dimension"
    reference = "Lee-Thorp et al. 2022, FNet: Mixing Tokens with Fourier Transforms"
    time_complexity = "O(N log N d + N d log d)"
    memory_complexity = "O(N d)"
    causal_modes = (False,)
    inputs = "v"
    params = {"norm": Param("ortho", "FFT scaling", choices=("ortho", "backward"))}

    def _apply(self, xp, q, k, v, causal):
        return xp.fft.fft(self._values(xp, v), axis=2, norm=self.norm).real

    def _values(self, xp, v):
        return xp.fft.fft(v, axis=-1, norm=self.norm)

    def _output(self, xp, y):
        return y.real

    def _matrix(self, xp, q, k, causal):
        n = q.shape[2]
        j = np.arange(n)
        f = np.exp(-2j * np.pi * np.outer(j, j) / n) / (np.sqrt(n) if self.norm == "ortho" else 1)
        cdt = np.complex64 if q.dtype == np.float32 else np.complex128
        return xp.broadcast_to(xp.asarray(f.astype(cdt)), q.shape[:2] + (n, n))

    def memory_bytes(self, n, batch, heads, head_dim, itemsize):
        return 10 * batch * heads * n * head_dim * itemsize
