"""GPU path: CuPy raw kernels (``kernels/``) and the CUDA-aware/staged ring exchange."""
