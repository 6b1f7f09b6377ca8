"""The running attention state of a ring rank on the GPU: every arriving key/value block gets its
own kernel call, merged into the result by log-sum-exp (the kernel has no resumable state)."""
from __future__ import annotations

from ..merge import merge_lse


class MergedAttention:
    """Blocks packed as k then v (batch, n, kv_heads, d); each block's attention merged in.

    ``attend`` is the per-block attention (default: the CUDA kernels' ``attention_gpu``) and
    ``xp`` its array module (default CuPy); tests pass the NumPy kernel to run this on the host.
    ``attend_kw`` go to every ``attend`` call.
    """

    def __init__(self, q, kv_heads, *, causal, scale, q_pos, attend=None, xp=None, **attend_kw):
        if attend is None:
            from .attention import attention_gpu as attend
        if xp is None:
            import cupy as xp
        self.q, self.causal, self.scale, self.q_pos = q, causal, scale, q_pos
        self.attend, self.xp, self.attend_kw = attend, xp, attend_kw
        b, _, _, d = q.shape
        self.shape = lambda n: (b, n, kv_heads, d)
        self.row = b * kv_heads * d
        self.out = self.lse = None

    def packed_size(self, n: int) -> int:
        return 2 * n * self.row

    def pack(self, k, v, buf):
        n = k.shape[1]
        buf[: n * self.row] = k.reshape(-1)
        buf[n * self.row: 2 * n * self.row] = v.reshape(-1)

    def add_packed(self, buf, n, k_pos, progress=None):
        """Fold in the block packed in ``buf``; ``progress`` is unused (the kernel runs
        asynchronously, so the host is free to progress MPI while it waits in the exchange)."""
        kb = buf[: n * self.row].reshape(self.shape(n))
        vb = buf[n * self.row: 2 * n * self.row].reshape(self.shape(n))
        o, l = self.attend(self.q, kb, vb, causal=self.causal, scale=self.scale, q_pos=self.q_pos,
                           k_pos=k_pos, **self.attend_kw)
        if self.out is None:
            self.out, self.lse = o, l
        else:
            merge_lse(self.out, self.lse, o, l, self.xp)

    def result(self):
        if self.out is None:
            raise ValueError("no key block was added")
        return self.out, self.lse
