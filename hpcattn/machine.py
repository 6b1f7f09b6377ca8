"""One description of this machine and its software: host, platform, CPU, BLAS, thread settings,
package versions and the MPI library.

Results provenance, ``hpcattn info`` and the benchmark all read these facts here; what the GPU path
adds (CuPy, NVRTC, GPUs, whether the MPI is CUDA-aware) lives in :mod:`hpcattn.gpu.environment`,
which builds on this module. Standard library, NumPy and mpi4py only, so every layer may use it.
Every probe turns a failure into a value ("unknown", a reason string): describing the machine
never stops a run.
"""
from __future__ import annotations

import os
import platform
import socket
from importlib import metadata

from ._threads import KERNEL_THREADS_VAR, THREAD_VARS

#: thread variables a measurement depends on (HPCATTN_NUM_THREADS overrides the others, see
#: _threads; HPCATTN_KERNEL_THREADS sets the CPU kernels' worker threads)
THREAD_SETTINGS = (*THREAD_VARS, "HPCATTN_NUM_THREADS", KERNEL_THREADS_VAR)
#: half-precision dtype -> /proc/cpuinfo flags of which one must be present for a native kernel
HALF_FLAGS = {"bfloat16": ("amx_bf16", "avx512_bf16"), "float16": ("amx_fp16", "avx512_fp16")}
#: installed distributions whose versions every description names
PACKAGES = ("numpy", "mpi4py", "h5py", "click", "ml_dtypes")


def hosts(comm=None) -> list[str]:
    """Sorted host names of the ranks of ``comm`` (collective), or of this process alone."""
    host = socket.gethostname()
    return sorted(set(comm.allgather(host))) if comm is not None else [host]


def os_platform() -> str:
    """Operating system, kernel and C library, e.g. 'Linux-6.1.0-x86_64-with-glibc2.36'."""
    return platform.platform()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> frozenset:
    """The CPU's feature flags (/proc/cpuinfo; empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_half_reason(dtype: str, flags=None) -> str | None:
    """None when this CPU has instructions for ``dtype`` (bfloat16/float16) math, else why not:
    without them torch emulates the type at a fraction of float32's speed, which we refuse."""
    flags = cpu_flags() if flags is None else flags
    want = HALF_FLAGS[dtype]
    if flags & set(want):
        return None
    return (f"{dtype} on CPU needs {' or '.join(f.upper() for f in want)} and this CPU "
            f"({cpu_model()}) has neither")


def blas() -> str:
    """Name and version of the BLAS NumPy was built with, e.g. 'scipy-openblas 0.3.29'."""
    try:
        import numpy as np

        info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{info.get('name')} {info.get('version')}"
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def thread_settings() -> dict[str, str]:
    """The thread variables as this process sees them ('' where unset)."""
    return {var: os.environ.get(var, "") for var in THREAD_SETTINGS}


def package_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """hpcattn, Python and :data:`PACKAGES` versions (None for a package not installed)."""
    from ._version import __version__

    return {"hpcattn": __version__, "python": platform.python_version(),
            **{dist: package_version(dist) for dist in PACKAGES}}


def mpi_library() -> dict:
    """The MPI library as the library itself names it: mpi4py version, the first line of
    MPI_Get_library_version and the MPI standard it implements; mpi4py None and the reason in
    'library' where mpi4py cannot be used."""
    try:
        import mpi4py
        from mpi4py import MPI
    except (ImportError, RuntimeError) as exc:  # RuntimeError: mpi4py cannot load the MPI library
        return {"mpi4py": None, "library": f"mpi4py not importable ({exc})"}
    try:
        # Open MPI pads the string with NULs, which HDF5 strings cannot hold
        line = MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0]
        return {"mpi4py": mpi4py.__version__, "library": line, "standard": "%d.%d" % MPI.Get_version()}
    except Exception as exc:  # noqa: BLE001 - an unusable MPI is a description, not a crash
        return {"mpi4py": None, "library": f"MPI library not queryable ({exc})"}


def cpu_kernel_settings() -> dict:
    """The CPU kernel as asked for (HPCATTN_CPU_KERNEL, '' = auto), torch's version (no import),
    and whether bfloat16/float16 have native instructions here (None = yes, else the reason)."""
    return {"requested": os.environ.get("HPCATTN_CPU_KERNEL", ""), "torch": package_version("torch"),
            **{dt: cpu_half_reason(dt) for dt in HALF_FLAGS}}


def describe(comm=None) -> dict:
    """Everything above in one dict; collective when ``comm`` is given (gathers host names)."""
    return {"hosts": hosts(comm), "platform": os_platform(), "cpu": cpu_model(),
            "cores": os.cpu_count(), "blas": blas(), "thread_vars": thread_settings(),
            "cpu_kernel": cpu_kernel_settings(),
            "versions": versions(), "mpi": mpi_library()}
