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


def pytest_ignore_collect(collection_path, config):
    """``test_*_mpi.py`` files run through tests/test_mpi_launch.py (under mpiexec, with
    --with-mpi); a plain serial run does not collect them a second time only to skip them."""
    if collection_path.name.startswith("test_") and collection_path.name.endswith("_mpi.py"):
        if not config.getoption("--with-mpi", default=False):
            return True
    return None
