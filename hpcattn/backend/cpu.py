"""The CPU backend: per-rank attention and its backward on the kernel ``hpcattn.cpu_kernels``
chooses (the fused kernel for float32 forwards where it builds, PyTorch's CPU flash kernel where
installed and the call is one it can express, else the NumPy blockwise kernels of
``hpcattn.blockwise`` / ``blockwise_backward``, on all the process's kernel workers), the ring's
online states (fused for float32 where it builds, else NumPy's; torch's kernel has none), the
plain MPI exchange and the host clock (a call has returned when its result exists, so wall time
is compute time)."""
from __future__ import annotations

import time

import numpy as np

from .. import blockwise, blockwise_backward, cpu_kernels
from ..devices import CPU_ATTENTION_DTYPES, CPU_DTYPES
from ..exchange import RingComm


class HostClock:
    """``start()``, ``computed()``, ``stop() -> (compute seconds, rest of the step)``."""

    def start(self):
        self.t0 = time.perf_counter()

    def computed(self):
        self.t1 = time.perf_counter()

    def stop(self) -> tuple[float, float]:
        busy = self.t1 - self.t0
        return busy, max(0.0, time.perf_counter() - self.t0 - busy)


class NumpyBackend:
    name = "cpu"
    xp = np
    dtypes = CPU_DTYPES
    #: per-rank attention (and its backward) also takes half types where the CPU has them
    #: (cpu_kernels refuses them with the reason elsewhere)
    attention_dtypes = CPU_ATTENTION_DTYPES
    head_dims = None  # any
    masks = True      # the kernels take mask= (hpcattn.masks.Mask)

    #: the input check's NaN/Inf search (compiled, for large contiguous float arrays)
    find_nonfinite = staticmethod(cpu_kernels.first_nonfinite)

    @staticmethod
    def check_dtype(q):
        """HpcattnError (with the reason) for a half type this CPU has no instructions for."""
        cpu_kernels.check_half(q)

    def attention(self, q, k, v, *, causal, scale, q_pos=None, k_pos=None, block_q=None,
                  block_k=None, progress=None, mask=None):
        return cpu_kernels.attention(q, k, v, causal=causal, scale=scale, q_pos=q_pos, k_pos=k_pos,
                                     block_q=block_q, block_k=block_k, progress=progress, mask=mask)

    def partial(self, q, kv_heads, *, causal, scale, q_pos, block_q=None, block_k=None, mask=None):
        """One online-softmax state that every arriving block is folded into (no merge), on the
        process's kernel workers: the fused kernel's (``cpu_fused.FusedPartial``) where
        ``cpu_kernels.partial_kernel`` chooses it, else NumPy's (``cpu_pool.ThreadedPartial``
        when there is more than one worker)."""
        from .._threads import kernel_workers

        workers = kernel_workers()
        kw = dict(causal=causal, scale=scale, q_pos=q_pos, block_q=block_q, block_k=block_k, mask=mask)
        if cpu_kernels.partial_kernel(q, block_q=block_q, block_k=block_k) == cpu_kernels.FUSED_KERNEL:
            from ..cpu_fused import FusedPartial

            return FusedPartial(q, kv_heads, workers=workers, **kw)
        if workers > 1 and q.shape[1] > (block_q or blockwise.DEFAULT_BLOCK_ROWS):
            from ..cpu_pool import ThreadedPartial

            return ThreadedPartial(q, kv_heads, workers=workers, **kw)
        return blockwise.PartialAttention(q, kv_heads, **kw)

    def attention_backward(self, q, k, v, out, lse, dout, *, causal, scale, q_pos=None, k_pos=None,
                           block_q=None, block_k=None, progress=None, mask=None):
        """FlashAttention-2's backward (inputs already validated), on the chosen kernel."""
        return cpu_kernels.attention_backward(
            q, k, v, out, lse, dout, causal=causal, scale=scale, q_pos=q_pos, k_pos=k_pos,
            block_q=block_q, block_k=block_k, progress=progress, mask=mask)

    def backward_state(self, q, out, lse, dout, kv_heads, *, causal, scale, q_pos, block_q=None,
                       block_k=None, mask=None):
        """One state every arriving key block is differentiated against (dq kept, dk/dv given)."""
        return blockwise_backward.BackwardState(q, out, lse, dout, kv_heads, causal=causal,
                                                scale=scale, q_pos=q_pos, block_q=block_q,
                                                block_k=block_k, mask=mask)

    def ring_comm(self, comm):
        return RingComm(comm)

    def clock(self):
        return HostClock()

    def use_device(self, comm=None):
        """Nothing to choose: every rank computes on its own cores."""

    def to_device(self, x):
        return x

    def to_host(self, x):
        return np.asarray(x)

    def synchronize(self):
        """NumPy has returned when its result exists."""

    def pool_bytes(self) -> int:
        return 0


NUMPY = NumpyBackend()
