"""The NumPy backend: the blockwise kernels of ``hpcattn.blockwise`` (forward) and
``hpcattn.blockwise_backward`` (backward), the plain MPI exchange and the host clock (NumPy
computes on the calling thread, so wall time is compute time)."""
from __future__ import annotations

import time

import numpy as np

from .. import blockwise, blockwise_backward
from ..devices import CPU_DTYPES
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
    head_dims = None  # any
    masks = True      # the kernels take mask= (hpcattn.masks.Mask)

    def attention(self, q, k, v, *, causal, scale, q_pos=None, k_pos=None, block_q=None,
                  block_k=None, progress=None, mask=None):
        return blockwise.attention(q, k, v, causal=causal, scale=scale, q_pos=q_pos, k_pos=k_pos,
                                   block_q=block_q, block_k=block_k, progress=progress, mask=mask)

    def partial(self, q, kv_heads, *, causal, scale, q_pos, block_q=None, block_k=None, mask=None):
        """One online-softmax state that every arriving block is folded into (no merge)."""
        return blockwise.PartialAttention(q, kv_heads, causal=causal, scale=scale, q_pos=q_pos,
                                          block_q=block_q, block_k=block_k, mask=mask)

    def attention_backward(self, q, k, v, out, lse, dout, *, causal, scale, q_pos=None, k_pos=None,
                           block_q=None, block_k=None, progress=None, mask=None):
        """FlashAttention-2's backward over tiles (inputs already validated)."""
        return blockwise_backward.attention_backward(
            q, k, v, out, lse, dout, causal=causal, scale=scale, q_pos=q_pos, k_pos=k_pos,
            block_q=block_q, block_k=block_k, check_finite=False, progress=progress, mask=mask)

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
