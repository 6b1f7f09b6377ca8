"""GPU path: CuPy raw kernels (``kernels/``) and the CUDA-aware/staged ring exchange.

Importing this package needs NumPy only; CuPy is imported when a GPU function runs.
"""
from .attention import attention_gpu
from .ring import cuda_aware_mpi, make_ring_comm, select_device

__all__ = ["attention_gpu", "make_ring_comm", "select_device", "cuda_aware_mpi"]
