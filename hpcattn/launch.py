"""Starting under MPI and stopping cleanly when something goes wrong.

* ``under_mpi()`` tells whether a launcher (mpiexec, srun --mpi=pmi2, ...) started us.
* ``find_mpiexec(python)`` is the one place that looks for mpiexec.
* ``load_mpi()`` imports mpi4py's MPI or raises :class:`MPIUnavailable` naming what to install.
* ``relaunch(np_, argv)`` re-executes the current command under ``mpiexec -n np_`` and stands in
  for it: signals are forwarded, nothing outlives the wrapper (see :func:`relaunch`).
* ``fail(exc, comm)`` prints a one-line error and ends the job: errors every rank raised together
  (``CollectiveError``) exit with status 2 on every rank; anything else raised on one rank calls
  ``MPI_Abort`` so the other ranks cannot hang in a collective.

No click here: a usage mistake is :class:`~hpcattn.errors.UsageError`, which the command line
(``hpcattn.cli``) shows with the command's usage.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

from ._threads import LAUNCHER_VARS, inherited_environment
from .errors import CollectiveError, HpcattnError, UsageError

#: what the ``--np`` wrapper passes on to mpiexec (which passes them on to every rank); the
#: runner stops after the current case on each of them, a second one ends the ranks at once
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

INSTALL_MPI = ("install one: pip install 'hpcattn[mpi]' (the MPICH wheel), or your system's MPI "
               "(e.g. apt install libmpich-dev) with mpi4py built against it")


class MPIUnavailable(RuntimeError):
    """mpi4py or the MPI library it needs cannot be loaded: a missing piece of the installation,
    not bad input, so the command line exits with status 1."""

    exit_status = 1


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


def load_mpi(*, initialize: bool = True):
    """``mpi4py.MPI``, or :class:`MPIUnavailable` with one line saying what to install (mpi4py
    raises RuntimeError 'cannot load MPI library' plus one line per path it tried).
    ``initialize=False`` only loads the library (the ``--np`` wrapper's check: no MPI_Init in a
    process that is not one of the ranks)."""
    try:
        import mpi4py

        if not initialize and hasattr(mpi4py, "rc"):
            mpi4py.rc.initialize = False
        from mpi4py import MPI
    except (ImportError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MPIUnavailable(f"MPI cannot be used ({reason}); {INSTALL_MPI}") from None
    return MPI


def _die_with_parent():
    """A ``preexec_fn``: the kernel sends SIGTERM to the child when the process that started it
    dies, even by SIGKILL, when no handler of ours can forward anything (Linux; elsewhere the
    forwarding handlers are all there is). ``prctl`` is looked up before the fork."""
    parent = os.getpid()
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl

    def setup():
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return setup


def exit_status(returncode: int) -> int:
    """A child's return code as a shell reports it: 128+N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode


def relaunch(np_: int, args: list[str]) -> int:
    """Run ``python -m hpcattn <args>`` under ``mpiexec -n np_``; its exit status.

    The wrapper stands in for mpiexec: SIGINT, SIGTERM and SIGUSR1 it receives go to mpiexec
    (which forwards them to every rank, so the job stops after the current case, exactly as
    under a plain mpiexec), it waits for mpiexec and exits with its status (128+N when a signal
    N ended mpiexec). mpiexec runs in its own process group, so a terminal's Ctrl-C reaches it
    once, through the wrapper (a rank that got it twice would stop at once, losing the current
    case), and it reads no terminal input (stdin is /dev/null). Should the wrapper die without
    forwarding (SIGKILL), the kernel sends mpiexec SIGTERM (PR_SET_PDEATHSIG). Ctrl-Z stops only
    the wrapper; the job runs on."""
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise UsageError(
            f"--np {np_} needs an MPI launcher but mpiexec was not found next to {sys.executable} "
            "or on PATH; install one (pip install 'hpcattn[mpi]') or start with your MPI's launcher")
    cmd = [mpiexec, "-n", str(np_), sys.executable, "-m", "hpcattn", *args]
    child: list[subprocess.Popen] = []
    early: list[int] = []   # signals that came before mpiexec existed

    def forward(signum, frame):
        if child:
            child[0].send_signal(signum)
        else:
            early.append(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        child.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, process_group=0,
                                      preexec_fn=_die_with_parent(), env=inherited_environment()))
        for signum in early:
            child[0].send_signal(signum)
        return exit_status(child[0].wait())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child and child[0].poll() is None:  # only after an error of our own: leave nothing
            child[0].terminate()
            try:
                child[0].wait(10)
            except subprocess.TimeoutExpired:
                child[0].kill()
                child[0].wait()


def world():
    return load_mpi().COMM_WORLD


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
