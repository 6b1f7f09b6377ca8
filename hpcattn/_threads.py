"""Thread settings for ranks that share a node, and what MPI launchers tell a rank about itself.

Under mpiexec every rank would otherwise start one BLAS thread per core, so P ranks on C cores
oversubscribe P-fold. Before NumPy is imported we set the usual thread variables to
``max(1, cores // local_ranks)`` unless the user set them. ``HPCATTN_NUM_THREADS`` overrides.

:data:`LAUNCHER_ENV` is the one table of launcher environment variables: :func:`hpcattn.launch.under_mpi`,
:func:`local_ranks` here and :func:`hpcattn.gpu.ring.local_rank` read it. It lives in this module
because it is needed before anything else is imported.
"""
from __future__ import annotations

import os
import sys

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")

#: launcher: (variables that mean it started this process, rank on the node, ranks on the node).
#: Order matters where two are set at once: a launcher's own variables come before Slurm's, which
#: mpiexec inside an allocation inherits from the batch step; the generic PMI ones come last.
LAUNCHER_ENV = {
    "MPICH (Hydra)": (("PMI_RANK", "PMI_SIZE", "HYDRA_CONTROL_FD", "MPI_LOCALNRANKS"),
                      "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    "Open MPI": (("OMPI_COMM_WORLD_SIZE",), "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "MVAPICH2": (("MV2_COMM_WORLD_SIZE",), "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
    "PMIx": (("PMIX_RANK",), None, None),
    # srun marks its ranks through the PMI plugin (PMI_RANK above); SLURM_* alone is a batch script
    "Slurm": ((), "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
    "PMI": ((), "PMI_LOCAL_RANK", "PMI_LOCAL_SIZE"),
}
LAUNCHER_VARS = tuple(v for started, _, _ in LAUNCHER_ENV.values() for v in started)
LOCAL_RANK_VARS = tuple(rank for _, rank, _ in LAUNCHER_ENV.values() if rank)
LOCAL_SIZE_VARS = tuple(size for _, _, size in LAUNCHER_ENV.values() if size)


def local_ranks() -> int | None:
    for var in LOCAL_SIZE_VARS:
        val = os.environ.get(var, "")
        if val.split("(")[0].isdigit():
            return int(val.split("(")[0])
    return None


def configure_threads() -> None:
    if "numpy" in sys.modules and "HPCATTN_NUM_THREADS" not in os.environ:
        return  # too late to matter, and the user is in charge
    want = os.environ.get("HPCATTN_NUM_THREADS")
    if want is None:
        nlocal = local_ranks()
        if not nlocal or nlocal <= 1:
            return
        want = str(max(1, (os.cpu_count() or 1) // nlocal))
    for var in THREAD_VARS:
        if "HPCATTN_NUM_THREADS" in os.environ:
            os.environ[var] = want
        else:
            os.environ.setdefault(var, want)
