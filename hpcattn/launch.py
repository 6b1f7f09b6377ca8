"""Starting under MPI and stopping cleanly when something goes wrong.

* ``under_mpi()`` tells whether a launcher (mpiexec, srun --mpi=pmi2, ...) started us.
* ``find_mpiexec(python)`` is the one place that looks for mpiexec.
* ``relaunch(np_, argv)`` re-executes the current command under ``mpiexec -n np_``.
* ``fail(exc, comm)`` prints a one-line error and ends the job: errors every rank raised together
  (``CollectiveError``) exit with status 2 on every rank; anything else raised on one rank calls
  ``MPI_Abort`` so the other ranks cannot hang in a collective.

No click here: a usage mistake is :class:`~hpcattn.errors.UsageError`, which the command line
(``hpcattn.cli``) shows with the command's usage.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from ._threads import LAUNCHER_VARS
from .errors import CollectiveError, HpcattnError, UsageError


def under_mpi() -> bool:
    return any(var in os.environ for var in LAUNCHER_VARS)


def find_mpiexec(python: str | None = None, *, path: str | None = None) -> str | None:
    """mpiexec next to ``python`` (default this one; the ``mpich`` wheel puts it there), then on
    ``path`` (default $PATH; ``""`` looks only beside ``python``). A relative ``python`` has no
    folder to look in."""
    python = sys.executable if python is None else python
    search = [os.path.dirname(python)] if os.path.isabs(python) else []
    search.append(os.environ.get("PATH", "") if path is None else path)
    return shutil.which("mpiexec", path=os.pathsep.join(filter(None, search)))


def relaunch(np_: int, args: list[str]) -> int:
    """Run ``python -m hpcattn <args>`` under ``mpiexec -n np_`` and return its exit code."""
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise UsageError(
            f"--np {np_} needs an MPI launcher but mpiexec was not found next to {sys.executable} "
            "or on PATH; install one (pip install 'hpcattn[mpi]') or start with your MPI's launcher")
    cmd = [mpiexec, "-n", str(np_), sys.executable, "-m", "hpcattn", *args]
    return subprocess.call(cmd)


def world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _error(message: str) -> None:
    sys.stderr.write(f"hpcattn: error: {message}\n")  # one write: ranks' lines do not interleave
    sys.stderr.flush()


def fail(exc: BaseException, comm=None) -> None:
    """Report ``exc`` in one line and end this process (the whole job when needed)."""
    comm = comm or world()
    size, rank = comm.size, comm.rank
    if isinstance(exc, CollectiveError):
        if rank == 0:
            _error(str(exc))
        sys.exit(2)
    where = f"rank {rank}/{size}: " if size > 1 else ""
    kind = "" if isinstance(exc, HpcattnError) else f"{type(exc).__name__}: "
    _error(f"{where}{kind}{exc}")
    if size > 1:
        time.sleep(0.5)  # let the launcher forward the message before Abort tears the job down
        comm.Abort(1)
    sys.exit(2 if isinstance(exc, HpcattnError) else 1)
