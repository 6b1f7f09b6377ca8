"""Thread settings for ranks that share a node, and what MPI launchers tell a rank about itself.

Under mpiexec every rank would otherwise start one BLAS thread per core, so P ranks on C cores
oversubscribe P-fold. Before NumPy is imported we set the usual thread variables to
``max(1, cores // local_ranks)`` unless the user set them. The ``hpcattn`` command running as a
single process (no launcher, or one rank on the node) gets one BLAS thread: its tiles are sized
for one core, and on a loaded machine all-core BLAS ran them 6-40x slower. A program that only
imports hpcattn keeps its own settings. ``HPCATTN_NUM_THREADS`` overrides both.

The CPU kernels use all of a process's cores themselves (:func:`kernel_workers`): C worker threads,
each calling one-thread BLAS, instead of C-thread BLAS on small tiles. C is the cores this process
may run on over the ranks sharing its node, but only where BLAS runs one thread (else BLAS already
uses the cores, and C = 1); ``HPCATTN_KERNEL_THREADS`` overrides it.

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


KERNEL_THREADS_VAR = "HPCATTN_KERNEL_THREADS"


def cores_available() -> int:
    """Cores this process may run on (its CPU affinity where the OS says, else all)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def blas_threads() -> int | None:
    """BLAS threads per process as the thread variables set them (None: not set, BLAS decides)."""
    for var in ("HPCATTN_NUM_THREADS", *THREAD_VARS):
        val = os.environ.get(var, "").strip()
        if val.isdigit() and int(val) > 0:
            return int(val)
    return None


def kernel_workers() -> int:
    """Worker threads a CPU kernel call uses (see the module docstring); ValueError for a bad
    ``HPCATTN_KERNEL_THREADS``."""
    want = os.environ.get(KERNEL_THREADS_VAR, "").strip()
    if want:
        if not want.isdigit() or int(want) < 1:
            raise ValueError(f"{KERNEL_THREADS_VAR}={want!r} is not a positive integer; expected "
                             "e.g. 1 or 4")
        return int(want)
    if blas_threads() != 1:
        return 1
    return max(1, cores_available() // (local_ranks() or 1))


#: thread variables configure_threads changed in this process -> their earlier value (None: unset)
_CHANGED: dict[str, str | None] = {}


def runs_the_command(argv=None, orig_argv=None) -> bool:
    """Whether this process runs the ``hpcattn`` command (its console script, or ``python -m
    hpcattn``) rather than a program that imports the library. Read from the interpreter's own
    command line, because it is needed while ``python -m`` is still importing the package."""
    argv = sys.argv if argv is None else argv
    if argv and os.path.basename(argv[0]) == "hpcattn":
        return True
    words = iter((getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv)[1:])
    for word in words:
        if word == "-m":
            return next(words, None) == "hpcattn"
        if word.startswith("-m"):
            return word == "-mhpcattn"
        if word in ("-X", "-W"):
            next(words, None)  # the option's value
        elif word.startswith("-c") or not word.startswith("-"):
            return False  # code or a script: the rest are its arguments
    return False


def threads_wanted() -> str | None:
    """BLAS threads per process this process should use, None to leave the settings alone."""
    want = os.environ.get("HPCATTN_NUM_THREADS")
    if want is not None:
        return want
    nlocal = local_ranks()
    if nlocal and nlocal > 1:
        return str(max(1, (os.cpu_count() or 1) // nlocal))
    return "1" if runs_the_command() else None


def configure_threads() -> None:
    if "numpy" in sys.modules and "HPCATTN_NUM_THREADS" not in os.environ:
        return  # too late to matter, and the user is in charge
    want = threads_wanted()
    if want is None:
        return
    for var in THREAD_VARS:
        if "HPCATTN_NUM_THREADS" in os.environ or var not in os.environ:
            if os.environ.get(var) != want:
                _CHANGED.setdefault(var, os.environ.get(var))
            os.environ[var] = want


def inherited_environment() -> dict[str, str]:
    """This environment as it was before :func:`configure_threads` chose thread counts for this
    process: what processes we start (mpiexec and its ranks) inherit, so each chooses its own."""
    env = dict(os.environ)
    for var, before in _CHANGED.items():
        if before is None:
            env.pop(var, None)
        else:
            env[var] = before
    return env
