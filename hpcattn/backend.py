"""The one place that decides between NumPy and CuPy arrays."""
from __future__ import annotations

import numpy as np


def array_module(x):
    """``cupy`` for CuPy arrays, ``numpy`` otherwise (CuPy is never imported for NumPy inputs)."""
    if type(x).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def is_gpu_array(x) -> bool:
    return type(x).__module__.startswith("cupy")
