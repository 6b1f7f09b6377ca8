"""Runs every ``tests/test_*_mpi.py`` under ``mpiexec -n P python -m pytest --with-mpi``.

A file lists its rank counts in a module-level ``MPI_SIZES = (2, 3)``; every file also runs on
1 rank. Each launch has a hard timeout, so a hang fails the test instead of blocking CI, and a
launch that collected no test fails too (a file whose tests all skip, e.g. GPU-only, passes).
"""
import ast
import glob
import os
import re
import subprocess
import sys

import pytest

from hpcattn.launch import find_mpiexec

from conftest import HERE

LAUNCH_TIMEOUT = 600


def mpi_files():
    for path in sorted(glob.glob(os.path.join(HERE, "test_*_mpi.py"))):
        sizes = (2,)
        tree = ast.parse(open(path).read())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "MPI_SIZES" for t in node.targets):
                sizes = tuple(ast.literal_eval(node.value))
        for size in sorted({1, *sizes}):
            yield pytest.param(path, size, id=f"{os.path.basename(path)}-np{size}")


@pytest.mark.parametrize("path, size", list(mpi_files()))
@pytest.mark.timeout(LAUNCH_TIMEOUT + 30)
def test_under_mpiexec(path, size):
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found (pip install 'hpcattn[mpi]')")
    cmd = [mpiexec, "-n", str(size), sys.executable, "-m", "pytest", "--with-mpi", "-q", "-rs",
           "-p", "no:cacheprovider", "-o", "addopts=", path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                              cwd=os.path.dirname(HERE))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} did not finish in {LAUNCH_TIMEOUT} s (hang?)\n{exc.stdout}")
    out = proc.stdout + proc.stderr
    if proc.returncode == 5 and re.search(r"^\d+ skipped in ", out, re.M):
        # the file skipped itself whole (an optional dependency missing: torch, CuPy), which
        # pytest reports as nothing collected: a skip with its reason, not a pass
        why = sorted({re.sub(r"\d+ skipped in [\d.]+s.*$", "", ln.split(": ", 1)[-1]).strip()
                      for ln in out.splitlines() if ln.startswith("SKIPPED")})  # (ranks' lines can merge)
        pytest.skip(f"{os.path.basename(path)} under mpiexec -n {size}: {'; '.join(why) or 'skipped'}")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{out[-6000:]}"
    # exit status 5 (nothing collected) already failed above; a GPU-only file may skip everything
    assert re.search(r"\b\d+ (passed|skipped)\b", out), f"no test ran under mpiexec -n {size}:\n{out[-3000:]}"
