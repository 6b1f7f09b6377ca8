"""The CUDA backend: CuPy arrays, the kernels of ``kernels/`` and the exchange of ``hpcattn.gpu``
(the only module outside ``hpcattn.gpu`` that imports it). CuPy itself is imported when used.

The kernels mask by positions only (``q_pos[i] >= k_pos[j]``); windows, packed sequences and
bottom-right causal go through ``hpcattn.mask_plan``, which splits each call into kernel calls
with at most one bound active (``kernels`` are attributes, so tests run this backend's planning
with the CUDA kernels under ``hpcattn.emulation`` and ``xp`` NumPy)."""
from __future__ import annotations

import numpy as np

from .. import gpu, mask_plan
from ..devices import GPU_DTYPES
from ..gpu.backward import attention_backward_gpu
from ..gpu.partial_backward import PerBlockBackward


def _host(pos):
    """Positions as a NumPy array (the plan is made on the host), or None."""
    if pos is None:
        return None
    return pos.get() if hasattr(pos, "get") and not isinstance(pos, np.ndarray) else np.asarray(pos)


def _extended(mask) -> bool:
    return mask is not None and mask.extended


class CudaBackend:
    name = "gpu"
    dtypes = GPU_DTYPES
    head_dims = gpu.kernels.HEAD_DIMS
    masks = True  # through hpcattn.mask_plan

    def __init__(self, attend=None, backward=None, xp=None):
        self._attend = attend or gpu.attention_gpu
        self._backward = backward or attention_backward_gpu
        self._xp = xp

    def _planned(self, mask):
        """``attend(q, k, v, *, causal, scale, q_pos, k_pos)`` applying ``mask`` by the plan."""
        def attend(q, k, v, *, causal, scale, q_pos=None, k_pos=None):
            return mask_plan.attention(self._attend, q, k, v, mask, scale=scale, q_pos=_host(q_pos),
                                       k_pos=_host(k_pos), xp=self.xp)
        return attend

    def _planned_backward(self, mask):
        """The backward under ``mask`` by the plan: every run's gradients come back in float32
        (the GPU dtypes' accumulation type) and are summed before the one cast to ``grad_dtype``."""
        def backward(q, k, v, out, lse, dout, *, causal, scale, q_pos=None, k_pos=None,
                     grad_dtype=None):
            return mask_plan.attention_backward(
                self._backward, q, k, v, out, lse, dout, mask, scale=scale, q_pos=_host(q_pos),
                k_pos=_host(k_pos), xp=self.xp, out_dtype=grad_dtype, grad_dtype="float32")
        return backward

    @property
    def xp(self):
        if self._xp is not None:
            return self._xp
        import cupy

        return cupy

    def attention(self, q, k, v, *, causal, scale, q_pos=None, k_pos=None, block_q=None,
                  block_k=None, progress=None, mask=None):
        """The CUDA kernels tile by their own configuration (``gpu.kernels``) and run
        asynchronously: ``block_q``/``block_k``/``progress`` do not apply."""
        attend = self._planned(mask) if _extended(mask) else self._attend
        return attend(q, k, v, causal=causal, scale=scale, q_pos=q_pos, k_pos=k_pos)

    def partial(self, q, kv_heads, *, causal, scale, q_pos, block_q=None, block_k=None, mask=None):
        """Attention per arriving block, merged by log-sum-exp (``gpu.MergedAttention``)."""
        attend = self._planned(mask) if _extended(mask) else self._attend
        return gpu.MergedAttention(q, kv_heads, causal=causal, scale=scale, q_pos=q_pos,
                                   attend=attend, xp=self.xp)

    def attention_backward(self, q, k, v, out, lse, dout, *, causal, scale, q_pos=None, k_pos=None,
                           block_q=None, block_k=None, progress=None, mask=None):
        """The backward kernels (``gpu.backward``); tiles and launches as the forward's."""
        backward = self._planned_backward(mask) if _extended(mask) else self._backward
        return backward(q, k, v, out, lse, dout, causal=causal, scale=scale, q_pos=q_pos, k_pos=k_pos)

    def backward_state(self, q, out, lse, dout, kv_heads, *, causal, scale, q_pos, block_q=None,
                       block_k=None, mask=None):
        """The backward kernels per arriving block with the global lse (``PerBlockBackward``)."""
        backward = self._planned_backward(mask) if _extended(mask) else self._backward
        return PerBlockBackward(q, out, lse, dout, kv_heads, causal=causal, scale=scale, q_pos=q_pos,
                                backward=backward, xp=self.xp)

    def ring_comm(self, comm):
        """Device buffers straight to a CUDA-aware MPI, else staged through pinned host memory."""
        return gpu.make_ring_comm(comm)

    def clock(self):
        return gpu.EventClock()

    def use_device(self, comm=None):
        """One GPU per rank, by node-local rank (before any CuPy array is made)."""
        gpu.select_device(comm)

    def to_device(self, x):
        return self.xp.asarray(x)

    def to_host(self, x):
        return self.xp.asnumpy(x)

    def synchronize(self):
        self.xp.cuda.get_current_stream().synchronize()

    def pool_bytes(self) -> int:
        """Bytes CuPy's memory pool holds (it keeps what it allocated: close to the peak)."""
        return int(self.xp.get_default_memory_pool().total_bytes())
