"""The CUDA backend: CuPy arrays, the kernels of ``kernels/`` and the exchange of ``hpcattn.gpu``
(the only module outside ``hpcattn.gpu`` that imports it). CuPy itself is imported when used."""
from __future__ import annotations

from .. import gpu
from ..devices import GPU_DTYPES
from ..gpu.backward import attention_backward_gpu
from ..gpu.partial_backward import PerBlockBackward


class CudaBackend:
    name = "gpu"
    dtypes = GPU_DTYPES
    head_dims = gpu.kernels.HEAD_DIMS

    @property
    def xp(self):
        import cupy

        return cupy

    def attention(self, q, k, v, *, causal, scale, q_pos=None, k_pos=None, block_q=None,
                  block_k=None, progress=None):
        """The CUDA kernels tile by their own configuration (``gpu.kernels``) and run
        asynchronously: ``block_q``/``block_k``/``progress`` do not apply."""
        return gpu.attention_gpu(q, k, v, causal=causal, scale=scale, q_pos=q_pos, k_pos=k_pos)

    def partial(self, q, kv_heads, *, causal, scale, q_pos, block_q=None, block_k=None):
        """Attention per arriving block, merged by log-sum-exp (``gpu.MergedAttention``)."""
        return gpu.MergedAttention(q, kv_heads, causal=causal, scale=scale, q_pos=q_pos)

    def attention_backward(self, q, k, v, out, lse, dout, *, causal, scale, q_pos=None, k_pos=None,
                           block_q=None, block_k=None, progress=None):
        """The backward kernels (``gpu.backward``); tiles and launches as the forward's."""
        return attention_backward_gpu(q, k, v, out, lse, dout, causal=causal, scale=scale,
                                      q_pos=q_pos, k_pos=k_pos)

    def backward_state(self, q, out, lse, dout, kv_heads, *, causal, scale, q_pos, block_q=None,
                       block_k=None):
        """The backward kernels per arriving block with the global lse (``PerBlockBackward``)."""
        return PerBlockBackward(q, out, lse, dout, kv_heads, causal=causal, scale=scale, q_pos=q_pos)

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
