"""The one table of devices and the dtypes each computes in (read by the CLI, jobs, cases,
validation and the mixers), and the dtype names' NumPy types."""
from __future__ import annotations

import numpy as np

from .errors import HpcattnError

#: device name -> dtypes its attention kernels take
DEVICE_DTYPES = {
    "cpu": ("float32", "float64"),
    "gpu": ("float16", "bfloat16", "float32"),
}
DEVICES = tuple(DEVICE_DTYPES)
CPU_DTYPES = DEVICE_DTYPES["cpu"]
GPU_DTYPES = DEVICE_DTYPES["gpu"]
#: per-rank CPU attention and its backward (``hpcattn.attention``) also take the half types on
#: CPUs with native instructions for them (PyTorch's CPU flash kernel, float32 accumulation, output
#: and lse like the GPU path); ``hpcattn.cpu_kernels`` refuses them with the reason elsewhere. The
#: ring, cases and the command line stay on CPU_DTYPES.
CPU_HALF_DTYPES = ("bfloat16", "float16")
CPU_ATTENTION_DTYPES = CPU_DTYPES + CPU_HALF_DTYPES
#: every dtype some device takes, in a stable order (CLI choices, job validation)
ALL_DTYPES = tuple(dict.fromkeys(CPU_DTYPES + GPU_DTYPES))
#: the mixers are float references, not kernels: the same dtypes on NumPy and CuPy
MIXER_DTYPES = ("float32", "float64")

#: max abs error ``--check`` accepts per dtype. float64/float32 accumulate in their own precision;
#: the half types accumulate in float32, and their error is that of rounding q, k, v and out to 11
#: (float16) or 8 (bfloat16) significant bits (about 4x the worst error seen in the kernel
#: emulation tests, which judge against a reference computed in that precision).
TOLERANCES = {"float64": 1e-10, "float32": 1e-5, "float16": 5e-3, "bfloat16": 4e-2}


def default_tolerance(dtype: str) -> float:
    return TOLERANCES[dtype]


def np_dtype(name: str) -> np.dtype:
    """The NumPy dtype for ``name``; bfloat16 is ml_dtypes' type (CuPy takes it too)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise HpcattnError("bfloat16 arrays need the ml_dtypes package (NumPy has no bfloat16); "
                               "expected it installed: pip install ml_dtypes") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
