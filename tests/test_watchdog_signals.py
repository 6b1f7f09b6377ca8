"""A stopped rank (SIGSTOP) under mpiexec: the healthy rank waits idle (it sleeps between tests
of its requests instead of spinning), and after HPCATTN_STALL_TIMEOUT it ends the whole job with
one line naming the stopped rank; no process is left behind. Every subprocess has a hard timeout.

The job is a loop of ``hpcattn.ring_attention`` calls on 2 ranks, so the stop lands in a ring
step or in the input check before one; both are behind the watchdog.
"""
import glob
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

STALL_TIMEOUT = 3        # seconds, as HPCATTN_STALL_TIMEOUT
ENDS_WITHIN = 15         # seconds from the stop to the end of the job: timeout + grace + slack
START_TIMEOUT = 120      # the first ring on a loaded machine
MEASURE_FROM, MEASURE_S = 0.5, 2.0   # after the stop, well before the timeout
STOPPED = 1

RING_LOOP = """
import os
import numpy as np
from mpi4py import MPI
import hpcattn

comm = MPI.COMM_WORLD
q, k, v = (np.random.default_rng(comm.rank).standard_normal((1, 512, 4, 32)) for _ in range(3))
print(f"rank {comm.rank} pid {os.getpid()}", flush=True)
calls = 0
while True:
    hpcattn.ring_attention(q, k, v, comm)
    calls += 1
    if calls == 3 and comm.rank == 0:
        print("ring running", flush=True)
"""


def runnable_seconds(pid):
    """CPU time plus time waiting for a CPU (all threads, /proc/PID/task/*/schedstat), or None.

    A busy-polling process is runnable all the time however loaded the machine is; a sleeping
    one only for its few wake-ups. Its CPU time alone would be small on a busy machine either way.
    """
    total, found = 0, False
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            on_cpu, waiting, _ = map(int, open(path).read().split())
        except (OSError, ValueError):
            continue
        total, found = total + on_cpu + waiting, True
    return total / 1e9 if found else None


def cpu_seconds(proc):
    times = proc.cpu_times()
    return times.user + times.system


def alive(pids):
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def read_rank_pids(proc, size):
    """{rank: pid} from the ranks' first lines, once rank 0 says the ring runs."""
    pids, running, deadline = {}, False, time.monotonic() + START_TIMEOUT
    while not (running and len(pids) == size):
        if time.monotonic() > deadline or proc.poll() is not None:
            pytest.fail(f"the ring did not start: {pids}, exit {proc.poll()}")
        line = proc.stdout.readline()  # ranks' lines may share a line: parse every match
        pids.update({int(r): int(p) for r, p in re.findall(r"rank (\d+) pid (\d+)", line)})
        running = running or "ring running" in line
    return pids


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """Run the ring on 2 ranks, SIGSTOP rank 1, and record what happened."""
    from conftest import mpiexec_path

    mpiexec = mpiexec_path()
    if mpiexec is None:
        pytest.skip("mpiexec not found (pip install 'hpcattn[mpi]')")
    script = tmp_path_factory.mktemp("stall") / "ring_loop.py"
    script.write_text(RING_LOOP)
    env = dict(os.environ, HPCATTN_STALL_TIMEOUT=str(STALL_TIMEOUT), OPENBLAS_NUM_THREADS="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([mpiexec, "-n", "2", sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    pids = {}
    try:
        pids = read_rank_pids(proc, 2)
        healthy = psutil.Process(pids[0])
        os.kill(pids[STOPPED], signal.SIGSTOP)
        stopped_at = time.monotonic()
        time.sleep(MEASURE_FROM)
        cpu0, run0 = cpu_seconds(healthy), runnable_seconds(pids[0])
        time.sleep(MEASURE_S)
        cpu1, run1 = cpu_seconds(healthy), runnable_seconds(pids[0])
        try:
            _, err = proc.communicate(timeout=ENDS_WITHIN + 30)
        except subprocess.TimeoutExpired:
            err = "(the job did not end)"
        ended_after = time.monotonic() - stopped_at
        deadline = time.monotonic() + 10   # the launcher's SIGKILLs take a moment
        while alive(pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return {"returncode": proc.poll(), "stderr": err, "ended_after": ended_after,
                "cpu": (cpu1 - cpu0) / MEASURE_S,
                "runnable": None if run0 is None or run1 is None else (run1 - run0) / MEASURE_S,
                "left_behind": alive(pids.values())}
    finally:
        for pid in alive(pids.values()):
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=30)


@pytest.mark.timeout(START_TIMEOUT + ENDS_WITHIN + 90)
def test_a_stopped_rank_ends_the_job_with_one_line_naming_it(stopped_run):
    run = stopped_run
    assert run["returncode"] not in (0, None), run
    assert run["ended_after"] < ENDS_WITHIN, run
    lines = [ln for ln in run["stderr"].splitlines() if ln.startswith("hpcattn: error:")]
    assert len(lines) == 1, run["stderr"]
    assert re.fullmatch(
        rf"hpcattn: error: rank 0: (no message from rank {STOPPED}|rank {STOPPED} did not receive our block"
        rf"|no answer from rank {STOPPED}) for \d+(\.\d)? s \([^)]+\); expected .+; "
        r"set HPCATTN_STALL_TIMEOUT to wait longer", lines[0]), lines[0]


@pytest.mark.timeout(START_TIMEOUT + ENDS_WITHIN + 90)
def test_no_process_is_left_behind(stopped_run):
    assert stopped_run["left_behind"] == [], stopped_run


@pytest.mark.timeout(START_TIMEOUT + ENDS_WITHIN + 90)
def test_the_waiting_rank_is_idle(stopped_run):
    # a busy poll burns a whole core: CPU time ~1 s per s on an idle machine, and runnable
    # (on a CPU or queued for one) ~1 s per s on any machine; a sleeping wait is near 0 for both
    assert stopped_run["cpu"] < 0.3, stopped_run
    if stopped_run["runnable"] is not None:
        assert stopped_run["runnable"] < 0.5, stopped_run
