"""Killing a job under mpiexec mid-run: SIGKILL of one rank, SIGTERM of the launcher. The master
file still opens, completed cases are intact, and a rerun finishes the rest so the final file
equals an uninterrupted run (everything but timings). Every subprocess has a hard timeout."""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from hpcattn import results
from hpcattn.errors import HpcattnError

from jobfiles import assert_same_results, comparable, write_job

RUN_TIMEOUT = 120
# eight cases of a few tenths of a second each on 2 ranks: the kill lands mid-run
SWEEP = {"seq_len": [2048 + 256 * i for i in range(8)], "heads": 4, "head_dim": 32, "dtype": "float64",
         "causal": True, "layout": "zigzag", "repeats": 2, "check_rows": 8}


def hpcattn_run(mpiexec, job, out, *extra, wait=True):
    cmd = [mpiexec, "-n", "2", sys.executable, "-m", "hpcattn", "run", job, "--output", out, *extra]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import mpiexec_path

    mpiexec = mpiexec_path()
    if mpiexec is None:
        pytest.skip("mpiexec not found (pip install 'hpcattn[mpi]')")
    tmp = tmp_path_factory.mktemp("ref")
    job = write_job(tmp / "kill.toml", sweep=SWEEP, activations=True, compression="lzf")
    out = str(tmp / "ref.h5")
    proc = hpcattn_run(mpiexec, job, out)
    assert proc.returncode == 0, proc.stderr
    return mpiexec, job, comparable(out)


def wait_for_first_case(proc, out, timeout=RUN_TIMEOUT):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if results.completed(out):
                return
        except HpcattnError:
            pass  # not created yet
        if proc.poll() is not None:
            pytest.fail(f"run ended before any case completed: {proc.communicate()[1]}")
        time.sleep(0.05)
    pytest.fail("no case completed in time")


def finish(proc):
    try:
        return proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the killed run did not end")


def check_interrupted_then_resume(mpiexec, job, out, ref):
    done = results.completed(out)                        # opens: the master is whole
    assert 1 <= len(done) < len(SWEEP["seq_len"]), f"kill did not land mid-run: {sorted(done)}"
    partial = comparable(out)
    names = {results.case_name(c) for c in done}
    assert {k.split("/")[0] for k in partial} == names
    assert_same_results(partial, {k: v for k, v in ref.items() if k.split("/")[0] in names})
    proc = hpcattn_run(mpiexec, job, out)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(done)} already done" in proc.stdout
    assert_same_results(comparable(out), ref)


def kill_mid_run(reference, out, kill):
    """Start the job, let one case complete, call ``kill(launcher)``; the run's stderr."""
    mpiexec, job, ref = reference
    proc = hpcattn_run(mpiexec, job, out, wait=False)
    wait_for_first_case(proc, out)
    kill(proc)
    _, err = finish(proc)
    assert proc.returncode != 0
    check_interrupted_then_resume(mpiexec, job, out, ref)
    return err


def sigkill_one_rank(proc):
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "hpcattn" in " ".join(p.cmdline())]
    assert len(ranks) == 2, [p.cmdline() for p in ranks]
    os.kill(max(p.pid for p in ranks), signal.SIGKILL)


@pytest.mark.timeout(4 * RUN_TIMEOUT)
def test_sigkill_one_rank_then_resume(reference, tmp_path):
    kill_mid_run(reference, str(tmp_path / "killed.h5"), sigkill_one_rank)


@pytest.mark.timeout(4 * RUN_TIMEOUT)
def test_sigterm_launcher_stops_cleanly_then_resume(reference, tmp_path):
    err = kill_mid_run(reference, str(tmp_path / "termed.h5"), lambda p: os.kill(p.pid, signal.SIGTERM))
    assert "stopped by SIGTERM; rerun the same command" in err
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
