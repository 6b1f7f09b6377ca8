"""``hpcattn run --np 2`` stands in for mpiexec: a signal to the wrapper (or ``timeout``, or a
terminal's Ctrl-C to its process group) stops the job after the current case with the exit
status a plain mpiexec gives, and no process of the run is left behind, even when the wrapper
itself is SIGKILLed. Every test records the run's processes before the signal, checks that all
are gone a few seconds after, kills whatever is left in a ``finally``, and resumes the results
file to complete. Every subprocess has a hard timeout."""
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from hpcattn import results
from hpcattn.errors import HpcattnError
from hpcattn.launch import exit_status, find_mpiexec

from jobfiles import write_job

RUN_TIMEOUT = 120
GONE_WITHIN = 10  # seconds for the ranks to finish their case and everything to exit
# six cases of a few tenths of a second each on 2 ranks: the signal lands mid-run
SWEEP = {"seq_len": [2048 + 256 * i for i in range(6)], "heads": 4, "head_dim": 32, "dtype": "float64",
         "causal": True, "layout": "zigzag", "repeats": 2, "check_rows": 8}
CASES = len(SWEEP["seq_len"])
MPIEXEC = find_mpiexec() or "mpiexec"


@pytest.fixture
def job(tmp_path, mpiexec):
    return write_job(tmp_path / "slow.toml", sweep=SWEEP)


def hpcattn_run_np(job, out, prefix=()):
    """The wrapper as a terminal would start it: leader of its own process group."""
    cmd = [*prefix, sys.executable, "-m", "hpcattn", "run", "--np", "2", job, "--output", out]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def descendants(proc) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def completed(out) -> set:
    try:
        return set(results.completed(out))
    except HpcattnError:
        return set()  # not written yet


def name_of(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return "(gone)"


def wait_for_first_case(proc, out, seen: dict) -> None:
    """Until one case is complete, remembering every process of the run met on the way (for the
    cleanup: whatever the test started is killed in the end)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < RUN_TIMEOUT:
        seen.update((p.pid, p) for p in descendants(proc))
        if completed(out):
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before any case completed: {proc.communicate()[1]}")
        time.sleep(0.05)
    pytest.fail("no case completed in time")


def still_running(procs) -> list[psutil.Process]:
    """Those of ``procs`` still alive after GONE_WITHIN seconds (an unreaped zombie is gone)."""
    _, alive = psutil.wait_procs(procs, timeout=GONE_WITHIN)
    left = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.NoSuchProcess:
            pass
    return left


def kill_all(proc, procs) -> None:
    """The test's own cleanup: whatever of this run still exists gets SIGKILL."""
    for p in [*procs, *descendants(proc)]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if proc.poll() is None:
        proc.kill()
    try:
        proc.communicate(timeout=10)
    except (subprocess.TimeoutExpired, ValueError):
        pass


def finish(proc) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail("the signalled run did not end")


def assert_stopped_and_resumes(job, out, err, procs):
    left = still_running(procs)
    assert not left, f"left behind: {[(p.pid, name_of(p)) for p in left]}"
    done = completed(out)
    assert 1 <= len(done) < CASES, f"the stop did not land mid-run: {sorted(done)}\n{err}"
    resumed = subprocess.run([sys.executable, "-m", "hpcattn", "run", "--np", "2", job, "--output", out],
                             capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(done)} already done" in resumed.stdout
    assert completed(out) == set(range(CASES))


def signal_mid_run(job, out, send, prefix=()):
    """Start the run, let one case complete, ``send(proc, processes)``; (status, stderr, processes)."""
    proc = hpcattn_run_np(job, out, prefix)
    seen: dict = {}
    try:
        wait_for_first_case(proc, out, seen)
        procs = descendants(proc)  # the run's processes when the signal comes
        seen.update((p.pid, p) for p in procs)
        names = [name_of(p) for p in procs]
        assert [n for n in names if n.startswith(MPIEXEC)] and len([n for n in names if "hpcattn run" in n]) >= 3, names
        send(proc, procs)
        _, err = finish(proc)
        return proc.returncode, err, procs
    finally:
        kill_all(proc, seen.values())


@pytest.mark.timeout(3 * RUN_TIMEOUT)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_the_wrapper_is_forwarded(job, tmp_path, signum):
    out = str(tmp_path / "r.h5")
    status, err, procs = signal_mid_run(job, out, lambda proc, _: os.kill(proc.pid, signum))
    assert status == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name}; rerun the same command" in err
    assert_stopped_and_resumes(job, out, err, procs)


@pytest.mark.timeout(3 * RUN_TIMEOUT)
def test_ctrl_c_stops_after_the_current_case_with_130(job, tmp_path):
    """A terminal sends SIGINT to its foreground process group: the wrapper's. mpiexec is in a
    group of its own, so the ranks get Ctrl-C once, through the wrapper, and finish their case."""
    out = str(tmp_path / "r.h5")

    def ctrl_c(proc, procs):
        mpiexec = next(p for p in procs if name_of(p).startswith(MPIEXEC))
        assert os.getpgid(mpiexec.pid) != os.getpgid(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)

    status, err, procs = signal_mid_run(job, out, ctrl_c)
    assert status == 130, err
    assert "stopped by SIGINT; rerun the same command" in err and "Aborted!" not in err
    assert_stopped_and_resumes(job, out, err, procs)


@pytest.mark.timeout(3 * RUN_TIMEOUT)
def test_sigkill_of_the_wrapper_leaves_nothing_running(job, tmp_path):
    """Nothing can forward a SIGKILL: the kernel tells mpiexec (PR_SET_PDEATHSIG -> SIGTERM)."""
    out = str(tmp_path / "r.h5")
    status, err, procs = signal_mid_run(job, out, lambda proc, _: os.kill(proc.pid, signal.SIGKILL))
    assert status == -signal.SIGKILL
    assert_stopped_and_resumes(job, out, err, procs)


@pytest.mark.timeout(3 * RUN_TIMEOUT)
@pytest.mark.parametrize("mode", [[], ["--foreground"]], ids=["group", "foreground"])
def test_timeout_leaves_nothing_running(job, tmp_path, mode):
    """``timeout N hpcattn run --np 2 ...`` ends on time with timeout's 124, and the ranks with it.
    timeout signals its whole process group, or with --foreground (as from scripts that keep
    the terminal) only the wrapper, which then alone can pass it on. The limit expires mid-run
    whatever the machine's load: SIGALRM is timeout's own clock running out."""
    timeout = shutil.which("timeout")
    if timeout is None:
        pytest.skip("no timeout command")
    out = str(tmp_path / "r.h5")
    expire = lambda proc, _: os.kill(proc.pid, signal.SIGALRM)  # noqa: E731
    status, err, procs = signal_mid_run(job, out, expire, prefix=(timeout, *mode, str(RUN_TIMEOUT)))
    assert status == 124, err
    assert "stopped by SIGTERM; rerun the same command" in err
    assert_stopped_and_resumes(job, out, err, procs)


def test_exit_status_follows_the_shell():
    assert [exit_status(rc) for rc in (0, 1, 130, -2, -15, -9)] == [0, 1, 130, 130, 143, 137]
