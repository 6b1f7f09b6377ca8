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

from ._threads import THREAD_VARS

#: thread variables a measurement depends on (HPCATTN_NUM_THREADS overrides the others, see _threads)
THREAD_SETTINGS = (*THREAD_VARS, "HPCATTN_NUM_THREADS")
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


def describe(comm=None) -> dict:
    """Everything above in one dict; collective when ``comm`` is given (gathers host names)."""
    return {"hosts": hosts(comm), "platform": os_platform(), "cpu": cpu_model(),
            "cores": os.cpu_count(), "blas": blas(), "thread_vars": thread_settings(),
            "versions": versions(), "mpi": mpi_library()}
