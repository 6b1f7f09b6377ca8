"""Helper shared by the CUDA-kernel emulation tests (forward and backward)."""
import pytest

from hpcattn import devices


def np_dtype(name):
    """The NumPy dtype of kernel dtype ``name``; skips the test for bfloat16 without ml_dtypes."""
    if name == "bfloat16":
        pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes (pip install '.[nvrtc]')")
    return devices.np_dtype(name)
