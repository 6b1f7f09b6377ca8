"""`hpcattn submit` / `hpcattn status` against a real Slurm: a one-node controller and daemon on
localhost, started by slurm/local-cluster.sh (needs root and Debian's slurmctld, slurmd,
slurm-client and munge; skipped with the reason otherwise). Every Slurm wait has a hard timeout,
and a job a test leaves behind is cancelled."""
import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from hpcattn.slurm import client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "slurm", "local-cluster.sh")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])

pytestmark = pytest.mark.slow


def _cluster(cmd: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([CLUSTER, cmd], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PATH": SBIN_PATH})


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of a running local cluster: the one already up, else one started here (and
    stopped again at the end, only the daemons started here)."""
    if shutil.which("slurmctld", path=SBIN_PATH) is None or shutil.which("sbatch") is None:
        pytest.skip("Slurm is not installed; 'slurm/local-cluster.sh install' (root, Debian) gets it")
    if os.getuid() != 0:
        pytest.skip("the local Slurm cluster needs root (slurmd runs jobs as root, munged as munge)")
    started = False
    proc = _cluster("status", 30)
    if proc.returncode != 0:
        proc = _cluster("start", 120)
        assert proc.returncode == 0, f"local Slurm did not come up:\n{proc.stdout}{proc.stderr}"
        started = True
    conf = re.search(r"export SLURM_CONF=(\S+)", proc.stdout).group(1)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    if started:
        _cluster("stop", 60)


def hpcattn(args, cwd, timeout=60):
    return subprocess.run([sys.executable, "-m", "hpcattn", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def write_job(folder, name, sweep, slurm_lines="", activations=False):
    path = folder / f"{name}.toml"
    path.write_text(textwrap.dedent(f"""\
        [job]
        name = "{name}"
        [sweep]
        {sweep}
        [output]
        path = "results/{name}.h5"
        activations = {str(activations).lower()}
        [slurm]
        ntasks_per_node = 2
        {slurm_lines}
        """))
    return path.name


class Jobs:
    """Submits through `hpcattn submit`; cancels whatever is still queued at the end."""

    def __init__(self, cwd):
        self.cwd, self.ids = cwd, []

    def submit(self, *args):
        proc = hpcattn(["submit", *args, "--parsable"], self.cwd)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        ids = proc.stdout.split()
        assert ids and all(i.isdigit() for i in ids), proc.stdout
        self.ids += ids
        return ids

    def wait(self, ids, timeout):
        """`hpcattn status --wait`; its exit status and report."""
        try:
            proc = hpcattn(["status", "--wait", *ids], self.cwd, timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"Slurm job(s) {ids} not finished within {timeout} s: "
                        + hpcattn(["status", *ids], self.cwd).stdout)
        return proc.returncode, proc.stdout + proc.stderr

    def cancel_all(self):
        for job_id in self.ids:
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


@pytest.fixture
def jobs(slurm_cluster, tmp_path):
    j = Jobs(tmp_path)
    yield j
    j.cancel_all()


def cases_of(path):
    """index -> run that computed it, of a results file (empty if not written yet)."""
    import h5py

    if not os.path.exists(path):
        return {}
    with h5py.File(path, "r") as f:
        return {int(g.attrs["index"]): int(g.attrs["run"]) for g in f["cases"].values()}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_submit_runs_a_job_that_writes_hdf5(jobs, tmp_path, launcher):
    import h5py
    import numpy as np

    job = write_job(tmp_path, "small", "seq_len = [256, 512]\ncausal = [false, true]\nheads = 2\n"
                    "head_dim = 16\ncheck_rows = 8", 'time = "00:03:00"', activations=True)
    (job_id,) = jobs.submit(job, "--launcher", launcher)
    rc, out = jobs.wait([job_id], 150)
    assert rc == 0, out
    assert re.search(rf"job {job_id}  small  COMPLETED  exit 0:0", out), out
    assert "results  results/small.h5 (4/4 cases complete)" in out
    with h5py.File(tmp_path / "results/small.h5", "r") as f:
        assert f.attrs["n_cases"] == 4 and len(f["cases"]) == 4
        assert f.attrs["ranks"] == 2, f"{launcher} must start one 2-rank job, not 2 singletons"
        for g in f["cases"].values():
            assert bool(g["check_passed"][()]) and np.asarray(g["wall_s"]).size == 1
            n = int(g.attrs["param_seq_len"])
            assert g["activations/out"].shape == (1, n, 2, 16)
            assert np.isfinite(g["activations/out"][...]).all()
    saved = (tmp_path / f"results/small.slurm/{job_id}.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in saved
    assert ("srun --mpi=pmi2 " if launcher == "srun" else '/mpiexec -n "$SLURM_NTASKS" ') in saved
    assert "4/4 cases complete" in (tmp_path / f"results/small.slurm/{job_id}.out").read_text()


@pytest.mark.timeout(240)
def test_array_sweep_merged_into_one_file(jobs, tmp_path):
    job = write_job(tmp_path, "sweep", "seq_len = [128, 256]\ncausal = [false, true]\nheads = 2\n"
                    "head_dim = 8", 'time = "00:03:00"')
    array_id, merge_id = jobs.submit(job, "--array", "2", "--array-tasks", "2")
    rc, out = jobs.wait([array_id, merge_id], 200)
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[0] == f"array job {array_id}  sweep  tasks: 2 COMPLETED  (stderr in .err beside each log)"
    assert "part results/sweep.task0.h5 (2 cases complete)" in lines[1]
    assert "part results/sweep.task1.h5 (2 cases complete)" in lines[2]
    assert re.search(rf"job {merge_id}  sweep-merge  COMPLETED  exit 0:0", out), out
    assert cases_of(tmp_path / "results/sweep.task0.h5").keys() == {0, 2}
    assert cases_of(tmp_path / "results/sweep.task1.h5").keys() == {1, 3}
    assert cases_of(tmp_path / "results/sweep.h5").keys() == {0, 1, 2, 3}
    merged_log = (tmp_path / f"results/sweep.slurm/{merge_id}.merge.out").read_text()
    assert "4/4 cases from 2 files -> results/sweep.h5" in merged_log


SLOW = "seq_len = 8192\nseed = [{}]\nheads = 4\nhead_dim = 32\ncausal = true\nrepeats = 2"


@pytest.fixture(scope="module")
def case_seconds(tmp_path_factory):
    """Seconds one SLOW case takes here on 2 ranks (the interrupted jobs below are sized by it,
    so that they are cut on fast and slow machines alike)."""
    import h5py

    folder = tmp_path_factory.mktemp("calibrate")
    job = write_job(folder, "calibrate", SLOW.format("0, 1"))
    proc = hpcattn(["run", "--np", "2", job], folder, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with h5py.File(folder / "results/calibrate.h5", "r") as f:
        return max(float(g["elapsed_s"][()]) for g in f["cases"].values())


def sweep_of(seconds, case_seconds):
    """Number of SLOW cases that take about ``seconds`` (at least 6)."""
    return max(6, min(80, math.ceil(seconds / case_seconds)))


def wait_for_cases(path, n, timeout):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if len(cases_of(path)) >= n:
                return
        except OSError:
            pass  # caught mid-publish; try again
        time.sleep(0.5)
    pytest.fail(f"{path} did not reach {n} complete cases within {timeout} s")


@pytest.mark.timeout(300)
def test_cancelled_job_resumes(jobs, tmp_path, case_seconds):
    n = sweep_of(15, case_seconds)
    job = write_job(tmp_path, "cancel", SLOW.format(", ".join(map(str, range(n)))), 'time = "00:05:00"')
    results = tmp_path / "results/cancel.h5"
    (job_id,) = jobs.submit(job)
    wait_for_cases(results, 1, 120)
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    rc, out = jobs.wait([job_id], 60)
    assert rc == 1 and re.search(rf"job {job_id}  cancel  CANCELLED", out), out
    first = cases_of(results)        # the file opens and keeps what was complete
    assert 1 <= len(first) < n, f"cancel came too late to test anything: {out}"
    assert set(first.values()) == {0}
    (job_id,) = jobs.submit(job)     # the same submission again resumes
    rc, out = jobs.wait([job_id], 200)
    assert rc == 0, out
    assert f"results  results/cancel.h5 ({n}/{n} cases complete)" in out
    final = cases_of(results)
    assert final.keys() == set(range(n))
    assert {c: r for c, r in final.items() if c in first} == first, "completed cases were redone"
    assert all(r >= 1 for c, r in final.items() if c not in first)
    log = (tmp_path / f"results/cancel.slurm/{job_id}.out").read_text()
    assert f"{n - len(first)} run now, {len(first)} already done" in log


def job_ranks(job_id: str, n: int, timeout: float) -> list[int]:
    """PIDs of the ``n`` `hpcattn run` ranks of Slurm job ``job_id`` on this machine (by their
    command line and the SLURM_JOB_ID in their environment; the tests run as root)."""
    mark = f"SLURM_JOB_ID={job_id}".encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue  # gone, or a kernel thread
            if cmd[1:4] == [b"-m", b"hpcattn", b"run"] and mark in env:
                pids.append(int(entry))
        if len(pids) == n:
            return pids
        time.sleep(0.2)
    pytest.fail(f"job {job_id}: expected {n} 'hpcattn run' ranks on this machine within {timeout} s")


def frozen_state(pid: int, sig: int) -> str:
    """How a process we stopped is doing: "stopped", "pending" (``sig`` waits to be delivered to
    it), "running" (something sent it SIGCONT) or "gone"."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except FileNotFoundError:
        return "gone"
    if any(int(fields[k], 16) & (1 << (sig - 1)) for k in ("SigPnd", "ShdPnd")):
        return "pending"
    return "stopped" if fields["State"].split()[0] in ("T", "t") else "running"


def slurm_start_time(job_id: str) -> float:
    """The job's StartTime as a Unix time (scontrol prints local time)."""
    import datetime

    (rec,) = client.show_jobs([job_id])
    return datetime.datetime.fromisoformat(rec["StartTime"]).timestamp()


@pytest.mark.timeout(360)
def test_time_limit_stops_job_and_resubmission_completes(jobs, tmp_path, case_seconds):
    # Two minutes, warned 30 s before: slurmctld checks limits every 30 s and sends the warning
    # once less than 30 + 30 s remain, i.e. 60 to 90 s after the start; the limit itself strikes
    # at 120 to 150 s. So that the sweep is still running when the warning comes, however fast or
    # loaded this machine is, the ranks are frozen (SIGSTOP) once a case is complete, until the
    # warning reaches them (slurmstepd wakes stopped tasks with it; where it does not, it waits
    # pending and we wake them). Slurm's clock runs on meanwhile, so the limit is reached as
    # usual. `hpcattn run` then finishes the current case and stops: FAILED, exit 138.
    n = sweep_of(10, case_seconds)
    job = write_job(tmp_path, "limit", SLOW.format(", ".join(map(str, range(n)))),
                    'time = "2"\nsignal_before = 30')
    results = tmp_path / "results/limit.h5"
    (job_id,) = jobs.submit(job)
    wait_for_cases(results, 1, 110)  # under the 120 s limit: a late first case still stops cleanly
    ranks = job_ranks(job_id, 2, 30)
    warned_by = slurm_start_time(job_id) + 90 + 10   # the last moment the warning can come, and some
    try:
        for pid in ranks:
            os.kill(pid, signal.SIGSTOP)
        states = ["stopped"]
        while set(states) == {"stopped"} and time.time() < warned_by:
            time.sleep(0.5)
            states = [frozen_state(pid, signal.SIGUSR1) for pid in ranks]
    finally:
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    rc, out = jobs.wait([job_id], 120)
    out += f"\n(ranks after the freeze: {states})"
    assert rc == 1, out
    assert re.search(rf"job {job_id}  limit  FAILED  exit 138:0 \(stopped by SIGUSR1 before the time limit", out), out
    err = (tmp_path / f"results/limit.slurm/{job_id}.err").read_text()
    assert "stopped by SIGUSR1; rerun the same command" in err
    # states stays "stopped" only if the warning came before the freeze (a start slower than 60 s):
    # the exit status and the message above prove that it came all the same
    first = cases_of(results)
    assert 1 <= len(first) < n, out
    (job_id,) = jobs.submit(job, "--time", "00:05:00")
    rc, out = jobs.wait([job_id], 300)
    assert rc == 0, out
    final = cases_of(results)
    assert final.keys() == set(range(n))
    assert {c: r for c, r in final.items() if c in first} == first, "completed cases were redone"


@pytest.mark.timeout(120)
def test_quoted_paths_survive_real_sbatch(jobs, tmp_path):
    """The stand-in tests (test_slurm_hostile.py) parse #SBATCH lines as a shell would; here the
    real sbatch reads a quoted --output/--error/--comment holding $( ), quotes and #."""
    output = "results/$(touch PWNED) 'a' #b.h5"
    (tmp_path / "q;$(x).toml").write_text(textwrap.dedent(f"""\
        [job]
        name = "quoted"
        [sweep]
        seq_len = 128
        heads = 1
        [output]
        path = "{output}"
        [slurm]
        ntasks_per_node = 2
        run_args = "--check-rows '8'"
        """))
    (job_id,) = jobs.submit("q;$(x).toml")
    rc, out = jobs.wait([job_id], 100)
    assert rc == 0, out
    assert f"results  {output} (1/1 cases complete)" in out, "the comment names the results file"
    logs = tmp_path / "results/$(touch PWNED) 'a' #b.slurm"
    assert "1/1 cases complete" in (logs / f"{job_id}.out").read_text()
    assert (logs / f"{job_id}.err").exists()
    assert not [p for p in tmp_path.rglob("PWNED")]


@pytest.mark.timeout(60)
def test_slurm_rejection_is_reported(slurm_cluster, tmp_path):
    job = write_job(tmp_path, "rejected", "seq_len = 128")
    proc = hpcattn(["submit", job, "--partition", "nosuch"], tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("hpcattn: error: sbatch rejected the script: sbatch: error: ")
    assert "invalid partition" in proc.stderr.lower() and "nosuch" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "results/rejected.slurm").glob("*.sbatch"))


@pytest.mark.timeout(60)
def test_status_of_unknown_job(slurm_cluster, tmp_path):
    proc = hpcattn(["status", "999999"], tmp_path)
    assert proc.returncode == 1 and "Slurm does not know job(s) 999999" in proc.stdout
    assert client.show_jobs(["999999"]) == []


# --- slurm/local-cluster.sh itself, on its own directory and ports (the session's cluster stays) ---

def free_port_pair() -> int:
    """A port N with N and N + 1 free on loopback (slurmctld and slurmd)."""
    import socket

    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    pytest.skip("no two adjacent free ports on loopback")


@pytest.fixture
def own_cluster():
    """Runs local-cluster.sh on a fresh directory and ports; stops and removes it afterwards."""
    import tempfile

    if shutil.which("slurmctld", path=SBIN_PATH) is None or os.getuid() != 0:
        pytest.skip("needs root and Slurm installed ('slurm/local-cluster.sh install')")
    folder = tempfile.mkdtemp(prefix="hpcattn-slurm-test-", dir="/tmp")
    os.chmod(folder, 0o755)  # munged runs as munge and must reach its socket folder
    env = {**os.environ, "PATH": SBIN_PATH, "HPCATTN_SLURM_DIR": folder,
           "HPCATTN_SLURM_PORT": str(free_port_pair())}

    def run(cmd, timeout=90, **extra):
        return subprocess.run([CLUSTER, cmd], capture_output=True, text=True, timeout=timeout,
                              env={**env, **extra})
    run.port, run.folder = int(env["HPCATTN_SLURM_PORT"]), folder
    yield run
    run("stop", 60)
    run("clean", 30)


def daemons_of(folder: str) -> list[str]:
    """Command lines of processes started with files of ``folder`` (munged, slurmctld, slurmd)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if folder + "/" in cmd and any(d in cmd for d in ("munged", "slurmctld", "slurmd")):
            found.append(cmd)
    return found


@pytest.mark.timeout(60)
def test_local_cluster_refuses_a_port_in_use(own_cluster):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", own_cluster.port + 1))
        busy.listen()
        t0 = time.monotonic()
        proc = own_cluster("start")
    assert proc.returncode == 1 and time.monotonic() - t0 < 15, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"local-cluster.sh: port {own_cluster.port + 1} (slurmd) is already in use")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert daemons_of(own_cluster.folder) == [], "nothing may be started when a port is taken"


@pytest.mark.timeout(90)
def test_local_cluster_failed_start_stops_what_it_started(own_cluster):
    # slurmctld refuses a node of "x" CPUs: munged is up by then, and must be stopped again
    proc = own_cluster("start", HPCATTN_SLURM_CPUS="x")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "slurmctld did not start" in proc.stderr and "stopped munged" in proc.stderr, proc.stderr
    assert daemons_of(own_cluster.folder) == []
    assert own_cluster("status").returncode == 1
    proc = own_cluster("start")          # and a good start afterwards works
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(daemons_of(own_cluster.folder)) == 3
