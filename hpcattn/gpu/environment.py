"""What this machine offers the GPU path: CuPy, NVRTC, GPUs, MPI, caches (``hpcattn info``)."""
from __future__ import annotations

import os
from pathlib import Path

from . import kernels


def _first_line(text: str) -> str:
    return " ".join(text.strip().splitlines()[0].split()) if text.strip() else "?"


def cupy_report() -> dict:
    """CuPy/NVRTC versions and the GPUs CuPy sees; every failure becomes a reason string."""
    try:
        import cupy
    except ImportError as exc:
        return {"cupy": None, "gpus": [], "gpus_reason": f"CuPy not installed ({exc}); pip install '.[gpu]'"}
    rep = {"cupy": cupy.__version__, "gpus": []}
    try:
        from cupy.cuda import nvrtc

        rep["nvrtc"] = ".".join(map(str, nvrtc.getVersion()))
    except Exception as exc:  # noqa: BLE001 - a missing libnvrtc is a report, not a crash
        rep["nvrtc"] = f"unavailable ({_first_line(str(exc))})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no driver / no device
        rep["gpus_reason"] = _first_line(str(exc))
        return rep
    rep["driver"] = cupy.cuda.runtime.driverGetVersion()
    for i in range(count):
        p = cupy.cuda.runtime.getDeviceProperties(i)
        name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
        rep["gpus"].append({"id": i, "name": name, "sm": f"{p['major']}{p['minor']}",
                            "memory_gib": round(p["totalGlobalMem"] / 2**30, 1)})
    if not count:
        rep["gpus_reason"] = "the CUDA runtime reports 0 devices"
    return rep


def no_gpu_reason() -> str | None:
    """None when CuPy can use a GPU here, else why not (for test skips and messages)."""
    rep = cupy_report()
    return None if rep["gpus"] else rep["gpus_reason"]


def mpi_report() -> dict:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        return {"mpi4py": None, "library": f"mpi4py not importable ({exc})"}
    from .ring import cuda_aware_mpi

    import mpi4py

    aware, why = cuda_aware_mpi()
    return {"mpi4py": mpi4py.__version__, "library": _first_line(MPI.Get_library_version()),
            "standard": "{}.{}".format(*MPI.Get_version()), "cuda_aware": aware, "cuda_aware_reason": why}


def cache_report() -> dict:
    cupy_cache = Path(os.environ.get("CUPY_CACHE_DIR") or Path.home() / ".cupy" / "kernel_cache")
    files = list(cupy_cache.glob("*.cubin")) if cupy_cache.is_dir() else []
    return {"kernel_dir": str(kernels.KERNEL_DIR),
            "kernel_sources": sorted(p.name for p in kernels.KERNEL_DIR.glob("*.cu*")),
            "kernel_digest": kernels.sources_digest(),
            "cupy_cache_dir": str(cupy_cache), "cupy_cache_cubins": len(files),
            "cupy_cache_bytes": sum(f.stat().st_size for f in files)}
