"""The backward state of a ring rank on the GPU: the backward kernels run once per arriving
key/value block, with the rank's GLOBAL log-sum-exp and output.

FlashAttention-2's backward is block-decomposable once the final ``lse`` is known: with
``P = exp(S - lse)`` and ``D = rowsum(dout * out)`` taken from the whole sequence, a key block's
``dk``/``dv`` depend on that block alone, and dq is the sum of every block's contribution. So each
block is one ``attention_backward_gpu`` call (its ``delta`` kernel recomputes the same D from the
global ``out``/``dout``: O(N·d) against the block's O(N·n·d)); dq is summed in float32 on the
device, and each block's dk/dv come back in float32 for the ring to sum across ranks.
"""
from __future__ import annotations

import numpy as np


class PerBlockBackward:
    """The interface of ``blockwise_backward.BackwardState`` for CUDA kernels.

    Blocks are packed as k then v, each (batch, n, kv_heads, d), in the input precision
    (``packed_dtype``); gradient buffers hold dk then dv in the same layout in ``acc_dtype``
    (float32; float64 for float64 inputs). ``backward`` is the per-block backward (default: the
    CUDA kernels' ``attention_backward_gpu``) and ``xp`` its array module (default CuPy); tests
    pass a NumPy backward to run this on the host. ``backward_kw`` go to every ``backward`` call.
    """

    def __init__(self, q, out, lse, dout, kv_heads, *, causal, scale, q_pos, backward=None,
                 xp=None, **backward_kw):
        if backward is None:
            from .backward import attention_backward_gpu as backward
        if xp is None:
            import cupy as xp
        self.q, self.out, self.lse, self.dout = q, out, lse, dout
        self.causal, self.scale, self.q_pos = causal, scale, q_pos
        self.backward, self.backward_kw, self.xp = backward, backward_kw, xp
        b, _, _, d = q.shape
        self.shape = lambda n: (b, n, kv_heads, d)
        self.row = b * kv_heads * d
        self.dtype = self.packed_dtype = q.dtype
        wide = np.dtype(q.dtype) == np.float64
        self.acc_dtype = np.dtype(np.float64 if wide else np.float32)
        self.grad_dtype = None if wide else "float32"  # what backward returns: acc_dtype
        self.dq_acc = xp.zeros(q.shape, dtype=self.acc_dtype)

    def packed_size(self, n: int) -> int:
        return 2 * n * self.row

    grads_size = packed_size  # dk, dv: the shape of k, v

    def pack(self, k, v, buf):
        n = k.shape[1]
        buf[: n * self.row] = k.reshape(-1)
        buf[n * self.row: 2 * n * self.row] = v.reshape(-1)

    def _halves(self, buf, n):
        return (buf[: n * self.row].reshape(self.shape(n)),
                buf[n * self.row: 2 * n * self.row].reshape(self.shape(n)))

    def add_block(self, buf, n, k_pos, grads, progress=None):
        """Add the block packed in ``buf`` (``n`` keys at global positions ``k_pos``): its dk/dv
        into ``grads``, its share into dq. ``progress`` is unused (the kernels run
        asynchronously, so the host progresses MPI while it waits in the exchange)."""
        kb, vb = self._halves(buf, n)
        dq, dk, dv = self.backward(self.q, kb, vb, self.out, self.lse, self.dout, causal=self.causal,
                                   scale=self.scale, q_pos=self.q_pos, k_pos=k_pos,
                                   grad_dtype=self.grad_dtype, **self.backward_kw)
        self.dq_acc += dq
        dk_acc, dv_acc = self._halves(grads, n)
        dk_acc += dk
        dv_acc += dv

    def block(self, k, v, *, k_pos=None, progress=None):
        """``(dk, dv)`` of the key block ``k``, ``v`` in the input dtype; its share of dq is added."""
        n = k.shape[1]
        buf = self.xp.empty(self.packed_size(n), dtype=self.packed_dtype)
        self.pack(k, v, buf)
        grads = self.xp.zeros(self.grads_size(n), dtype=self.acc_dtype)
        self.add_block(buf, n, k_pos, grads, progress)
        return self.unpack_grads(grads, n)

    def unpack_grads(self, grads, n: int):
        """``(dk, dv)`` (batch, n, kv_heads, d) in the input dtype."""
        return tuple(g.astype(self.dtype) for g in self._halves(grads, n))

    def dq(self):
        """dq (batch, Nq, heads, d) in the input dtype, once every key block has been added."""
        return self.dq_acc.astype(self.dtype)

