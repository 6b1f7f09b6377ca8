"""Where and with what a run happens, recorded on the master and on each of its runs."""
from __future__ import annotations

import os
import sys

from .. import machine
from .format import have_mpio, import_h5py, now

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME",
              "SLURM_JOB_NODELIST", "SLURM_CLUSTER_NAME")


def provenance(comm=None, argv=None) -> dict:
    """Where and with what a run happens. Collective when ``comm`` is given (gathers host names)."""
    from ..gpu.environment import cupy_report  # here: reading results needs no GPU modules

    h5py = import_h5py()
    versions = machine.versions()
    info = {
        "hpcattn_version": versions["hpcattn"],
        "started": now(),
        "hosts": machine.hosts(comm),
        "ranks": comm.size if comm is not None else 1,
        "python_version": versions["python"],
        "numpy_version": versions["numpy"],
        "h5py_version": h5py.version.version,
        "hdf5_version": h5py.version.hdf5_version,
        "h5py_mpi": have_mpio(),
        "platform": machine.os_platform(),
        "command": " ".join(sys.argv if argv is None else argv),
        # HPCATTN_CPU_KERNEL as asked (auto: torch-flash where installed and it can express the
        # call, float64/half types; each case records the kernel it ran as cpu_kernel)
        "cpu_kernel_requested": machine.cpu_kernel_settings()["requested"] or "auto",
    }
    mpi = machine.mpi_library()
    if mpi["mpi4py"] is not None:
        info.update({"mpi_library_version": mpi["library"], "mpi_version": mpi["standard"],
                     "mpi4py_version": mpi["mpi4py"]})
    info.update(gpu_provenance(cupy_report()))
    # under Slurm: which job (and array task) wrote this, to find its logs and script again
    info.update({var.lower(): os.environ[var] for var in SLURM_VARS if var in os.environ})
    return info


def gpu_provenance(report: dict) -> dict:
    """GPU names and driver/runtime versions from a :func:`~hpcattn.gpu.environment.cupy_report`
    where CuPy could ask the CUDA driver, else nothing."""
    if "driver" not in report:
        return {}
    return {"gpu_count": len(report["gpus"]), "gpu_names": [g["name"] for g in report["gpus"]],
            "cupy_version": report["cupy"], "cuda_runtime_version": report["runtime"],
            "cuda_driver_version": report["driver"]}
