import os
import shutil
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def mpiexec_path():
    here = os.path.dirname(sys.executable)
    return shutil.which("mpiexec", path=os.pathsep.join([here, os.environ.get("PATH", "")]))


@pytest.fixture
def mpiexec():
    path = mpiexec_path()
    if path is None:
        pytest.skip("mpiexec not found (pip install 'hpcattn[mpi]')")
    return path


@pytest.fixture
def hpcattn_cmd():
    """The hpcattn command as a user runs it, through this interpreter."""
    return [sys.executable, "-m", "hpcattn"]
