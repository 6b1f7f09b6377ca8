"""GPU path: CuPy raw kernels (``kernels/``), the running state of a ring rank, the CUDA-event
step clock and the CUDA-aware/staged ring exchange. Only ``hpcattn.backend`` imports this package.

Importing this package needs NumPy only; CuPy is imported when a GPU function runs.
"""
from .attention import attention_gpu
from .clock import EventClock
from .partial import MergedAttention
from .ring import cuda_aware_mpi, make_ring_comm, select_device

__all__ = ["attention_gpu", "MergedAttention", "EventClock", "make_ring_comm", "select_device",
           "cuda_aware_mpi"]
