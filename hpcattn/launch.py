"""Starting under MPI and stopping cleanly when something goes wrong.

* ``under_mpi()`` tells whether a launcher (mpiexec, srun --mpi=pmi2, ...) started us.
* ``relaunch(np_, argv)`` re-executes the current command under ``mpiexec -n np_``.
* ``fail(exc, comm)`` prints a one-line error and ends the job: errors every rank raised together
  (``CollectiveError``) exit with status 2 on every rank; anything else raised on one rank calls
  ``MPI_Abort`` so the other ranks cannot hang in a collective.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import click

from .errors import CollectiveError, HpcattnError

LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS",
                 "HYDRA_CONTROL_FD", "MV2_COMM_WORLD_SIZE")


def under_mpi() -> bool:
    return any(var in os.environ for var in LAUNCHER_VARS)


def find_mpiexec() -> str | None:
    """mpiexec next to this Python first (the ``mpich`` wheel puts it there), then PATH."""
    here = os.path.dirname(sys.executable)
    return shutil.which("mpiexec", path=os.pathsep.join([here, os.environ.get("PATH", "")]))


def relaunch(np_: int, args: list[str]) -> int:
    """Run ``python -m hpcattn <args>`` under ``mpiexec -n np_`` and return its exit code."""
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise click.UsageError(
            f"--np {np_} needs an MPI launcher but mpiexec was not found next to {sys.executable} "
            "or on PATH; install one (pip install 'hpcattn[mpi]') or start with your MPI's launcher")
    cmd = [mpiexec, "-n", str(np_), sys.executable, "-m", "hpcattn", *args]
    return subprocess.call(cmd)


def world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def fail(exc: BaseException, comm=None) -> None:
    """Report ``exc`` in one line and end this process (the whole job when needed)."""
    comm = comm or world()
    size, rank = comm.size, comm.rank
    if isinstance(exc, CollectiveError):
        if rank == 0:
            click.echo(f"hpcattn: error: {exc}", err=True)
        sys.exit(2)
    where = f"rank {rank}/{size}: " if size > 1 else ""
    kind = "" if isinstance(exc, (HpcattnError, click.ClickException)) else f"{type(exc).__name__}: "
    msg = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
    click.echo(f"hpcattn: error: {where}{kind}{msg}", err=True)
    if size > 1:
        sys.stderr.flush()
        time.sleep(0.5)  # let the launcher forward the message before Abort tears the job down
        comm.Abort(1)
    sys.exit(2 if isinstance(exc, (HpcattnError, click.ClickException)) else 1)
