import os
import sys

import pytest

from hpcattn.launch import find_mpiexec

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def mpiexec_path():
    """The mpiexec ``hpcattn run --np`` would use (beside this Python, then on PATH)."""
    return find_mpiexec()


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
