"""What this machine offers the GPU path: CuPy, NVRTC, GPUs, a CUDA-aware MPI or not, kernel
caches (``hpcattn info``, ``python -m hpcattn.gpu.check``, results provenance).

The rest of the machine (host, CPU, BLAS, versions, the MPI library) is :mod:`hpcattn.machine`.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..machine import mpi_library
from . import kernels


def _first_line(text: str) -> str:
    return " ".join(text.strip().splitlines()[0].split()) if text.strip() else "?"


def device_nodes() -> list[str]:
    """The NVIDIA GPU device nodes of this machine (``/dev/nvidia0``, ...; not nvidiactl/-uvm)."""
    dev = Path("/dev")
    return sorted(p.name for p in dev.glob("nvidia[0-9]*")) if dev.is_dir() else []


def cupy_report() -> dict:
    """CuPy/NVRTC versions, CUDA driver/runtime and the GPUs CuPy sees; every failure becomes a
    reason string (``gpus_reason``), never an exception."""
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 - ImportError, or a CuPy that fails to load
        return {"cupy": None, "gpus": [], "gpus_reason": f"CuPy not installed ({exc}); pip install '.[gpu]'"}
    rep = {"cupy": cupy.__version__, "gpus": []}
    try:
        from cupy.cuda import nvrtc

        rep["nvrtc"] = ".".join(map(str, nvrtc.getVersion()))
    except Exception as exc:  # noqa: BLE001 - a missing libnvrtc is a report, not a crash
        rep["nvrtc"] = f"unavailable ({_first_line(str(exc))})"
    runtime = cupy.cuda.runtime
    try:
        count = runtime.getDeviceCount()
        rep["driver"] = runtime.driverGetVersion()
        rep["runtime"] = runtime.runtimeGetVersion()
        for i in range(count):
            p = runtime.getDeviceProperties(i)
            name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
            rep["gpus"].append({"id": i, "name": name, "sm": f"{p['major']}{p['minor']}",
                                "memory_gib": round(p["totalGlobalMem"] / 2**30, 1)})
    except Exception as exc:  # noqa: BLE001 - no driver / no device: report none, and why
        reason = _first_line(str(exc))
        if not device_nodes() and ("InsufficientDriver" in reason or "NoDevice" in reason):
            # CUDA blames the driver when there is no GPU at all; say what the machine lacks
            reason = f"no GPU (no /dev/nvidia* device on this machine; CUDA says: {reason})"
        rep = {"cupy": rep["cupy"], "nvrtc": rep["nvrtc"], "gpus": [], "gpus_reason": reason}
        return rep
    if not count:
        rep["gpus_reason"] = "the CUDA runtime reports 0 devices"
    return rep


def no_gpu_reason() -> str | None:
    """None when CuPy can use a GPU here, else why not (for test skips and messages)."""
    rep = cupy_report()
    return None if rep["gpus"] else rep["gpus_reason"]


def mpi_report() -> dict:
    """:func:`hpcattn.machine.mpi_library` for people (whitespace collapsed) plus whether device
    buffers may be handed to MPI (``cuda_aware``) and why we think so."""
    from .ring import cuda_aware_mpi

    rep = mpi_library()
    rep["library"] = " ".join(rep["library"].split())
    if rep["mpi4py"] is not None:
        rep["cuda_aware"], rep["cuda_aware_reason"] = cuda_aware_mpi()
    return rep


def cache_report() -> dict:
    cupy_cache = Path(os.environ.get("CUPY_CACHE_DIR") or Path.home() / ".cupy" / "kernel_cache")
    files = list(cupy_cache.glob("*.cubin")) if cupy_cache.is_dir() else []
    return {"kernel_dir": str(kernels.KERNEL_DIR),
            "kernel_sources": sorted(p.name for p in kernels.KERNEL_DIR.glob("*.cu*")),
            "kernel_digest": kernels.sources_digest(),
            "cupy_cache_dir": str(cupy_cache), "cupy_cache_cubins": len(files),
            "cupy_cache_bytes": sum(f.stat().st_size for f in files)}
