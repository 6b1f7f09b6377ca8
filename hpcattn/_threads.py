"""Thread settings for ranks that share a node.

Under mpiexec every rank would otherwise start one BLAS thread per core, so P ranks on C cores
oversubscribe P-fold. Before NumPy is imported we set the usual thread variables to
``max(1, cores // local_ranks)`` unless the user set them. ``HPCATTN_NUM_THREADS`` overrides.
"""
from __future__ import annotations

import os
import sys

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE",
                   "SLURM_NTASKS_PER_NODE", "PMI_LOCAL_SIZE")


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
