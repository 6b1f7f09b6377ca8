"""``hpcattn run`` as a user runs it: through mpiexec, with --check, and when things go wrong."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT


#: this environment with the CPU kernel left to auto
AUTO = {key: val for key, val in os.environ.items() if key != "HPCATTN_CPU_KERNEL"}


def run(cmd, timeout=180, **kw):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(cmd)} hung for {timeout} s")


def test_help_explains_every_option(hpcattn_cmd):
    proc = run(hpcattn_cmd + ["run", "--help"])
    assert proc.returncode == 0
    for opt in ("--np", "--seq-len", "--heads", "--kv-heads", "--head-dim", "--dtype", "--causal",
                "--layout", "--seed", "--repeats", "--check", "--check-rows", "--tolerance",
                "--strategy", "--ulysses-size", "--backward", "--kv-pieces"):
        assert opt in proc.stdout


@pytest.mark.parametrize("np_, layout, extra", [
    (2, "zigzag", ["--causal"]),
    (3, "striped", ["--causal", "--kv-heads", "2"]),
    (4, "contiguous", ["--dtype", "float64"]),
    (3, "zigzag", ["--causal", "--kv-pieces", "3"]),
])
def test_np_launches_mpiexec_and_check_passes(hpcattn_cmd, mpiexec, np_, layout, extra):
    proc = run(hpcattn_cmd + ["run", "--np", str(np_), "-N", "1001", "-H", "4", "-d", "16",
                              "--layout", layout, "--check", "--check-rows", "32", *extra], env=AUTO)
    assert proc.returncode == 0, proc.stderr
    assert f"ranks              {np_}  (layout {layout}" in proc.stdout
    assert "PASSED" in proc.stdout and "N  1,001" in proc.stdout
    # the kernel that ran: float64 on NumPy's under auto, float32 on the fused one where it builds
    from hpcattn import cpu_fused

    want = ("cpp-fused" if "float64" not in extra and cpu_fused.reason() is None
            else "numpy-blockwise")
    assert f"  CPU kernel         {want}  (HPCATTN_CPU_KERNEL=auto)\n" in proc.stdout, proc.stdout


@pytest.mark.parametrize("np_, args, title", [
    (2, ["--backward", "--causal", "--layout", "zigzag"], "exact ring attention, forward + backward"),
    (3, ["--backward", "--kv-pieces", "3"], "exact ring attention, forward + backward"),
    (3, ["--strategy", "ulysses", "--backward", "--kv-heads", "2", "--layout", "striped"],
     "exact Ulysses (all-to-all) attention, forward + backward"),
    (4, ["--strategy", "hybrid", "--ulysses-size", "2", "--causal"],
     "exact hybrid attention (all-to-all in groups of 2, ring across)"),
    (4, ["--strategy", "hybrid", "--ulysses-size", "2", "--causal", "--backward", "--layout", "zigzag"],
     "exact hybrid attention (all-to-all in groups of 2, ring across), forward + backward"),
])
def test_strategies_and_backward_pass_their_check(hpcattn_cmd, mpiexec, np_, args, title):
    proc = run(hpcattn_cmd + ["run", "--np", str(np_), "-N", "777", "-H", "4", "-d", "16",
                              "--check", "--check-rows", "24", *args], env=AUTO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"hpcattn run: {title}\n")
    assert "PASSED" in proc.stdout
    assert ("; K/V blocks in 3 pieces)" in proc.stdout) == ("--kv-pieces" in args), proc.stdout
    if "--backward" in args:  # the check covers the gradients, and the backward is timed
        assert ", backward numpy-blockwise  (HPCATTN_CPU_KERNEL=auto)" in proc.stdout, proc.stdout
        assert "(dq)" in proc.stdout and "(dk)" in proc.stdout and "(dv)" in proc.stdout
        assert " backward (slowest rank" in proc.stdout and "3.5 x 4*B*N^2*H*d" in proc.stdout


def test_the_check_judges_the_gradients(monkeypatch):
    """A wrong gradient (here dk off by 1%) fails the case's check while out is right."""
    from mpi4py import MPI

    from hpcattn import cases

    real = cases.BACKWARD["ring"]

    def wrong_dk(*args, **kw):
        dq, dk, dv = real(*args, **kw)
        return dq, dk * 1.01, dv

    monkeypatch.setitem(cases.BACKWARD, "ring", wrong_dk)
    case = cases.AttentionCase(seq_len=300, heads=2, head_dim=8, backward=True, check_rows=16)
    res = cases.run_attention_case(case, MPI.COMM_SELF)
    assert res["max_out_err"] < 1e-5 and res["max_dq_err"] < 1e-5 and res["max_dv_err"] < 1e-5
    assert res["max_dk_err"] > 1e-4 and res["max_abs_err"] > cases.default_tolerance("float32")


def test_under_mpiexec_directly(hpcattn_cmd, mpiexec):
    proc = run([mpiexec, "-n", "2"] + hpcattn_cmd + ["run", "-N", "512", "-H", "2", "-d", "8", "--check"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("hpcattn run: exact ring attention") == 1  # rank 0 prints, once


def test_check_failure_exits_1(hpcattn_cmd, mpiexec):
    proc = run(hpcattn_cmd + ["run", "--np", "2", "-N", "256", "-H", "2", "-d", "8", "--check",
                              "--tolerance", "1e-30"])
    assert proc.returncode == 1 and "FAILED" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--np", "4", "-N", "3"], "sequence length N=3 is smaller than the number of ranks P=4; expected N >= P"),
    (["--np", "2", "-H", "6", "--kv-heads", "4"], "kv_heads=4 does not divide heads=6"),
    (["--np", "2", "--dtype", "float16"], "dtype 'float16' is not supported on cpu; expected one of float32, float64"),
    (["--np", "2", "--device", "gpu", "-d", "96"], "head_dim=96 is not supported by the GPU kernels; expected one of 64, 128"),
    (["--np", "4", "--strategy", "hybrid", "--ulysses-size", "3", "-N", "64"],
     "ulysses_size=3 on P=4 ranks; expected a positive divisor of 4"),
    (["--np", "2", "--ulysses-size", "2", "-N", "64"], "ulysses_size=2 is for strategy 'hybrid', not 'ring'"),
    (["--np", "2", "-N", "64", "--check", "--tolerance", "nan"], "tolerance=nan is invalid; expected a finite number"),
    (["--np", "2", "-N", "64", "--strategy", "ulysses", "--kv-pieces", "2"],
     "kv_pieces=2 is for the ring and hybrid strategies (ulysses passes no K/V blocks); expected 1"),
])
def test_bad_input_exits_2_with_one_line(hpcattn_cmd, mpiexec, args, message):
    proc = run(hpcattn_cmd + ["run", *args])
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if "hpcattn: error" in ln]
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_wrong_np_under_mpiexec(hpcattn_cmd, mpiexec):
    proc = run([mpiexec, "-n", "2"] + hpcattn_cmd + ["run", "--np", "3", "-N", "64"])
    assert proc.returncode != 0 and "--np 3 was given but this job already runs on 2 MPI ranks" in proc.stderr


def test_a_failing_rank_aborts_the_job_instead_of_hanging(mpiexec):
    """Rank 1 fails while rank 0 waits in a collective: fail() must MPI_Abort everyone."""
    code = ("from hpcattn.launch import fail, world\n"
            "c = world()\n"
            "if c.rank == 1:\n"
            "    fail(RuntimeError('disk on fire'), c)\n"
            "c.Barrier()\n")
    proc = run([mpiexec, "-n", "2", sys.executable, "-c", code], timeout=60)
    assert proc.returncode != 0
    assert "hpcattn: error: rank 1/2: RuntimeError: disk on fire" in proc.stderr


def test_np_without_mpiexec_is_a_clear_error(hpcattn_cmd, tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))
    # a python whose directory has no mpiexec: a symlink to this interpreter in an empty folder
    py = tmp_path / "python"
    py.symlink_to(sys.executable)
    proc = run([str(py), "-m", "hpcattn", "run", "--np", "2"], env=env)
    if "mpiexec was not found" not in proc.stderr:
        pytest.skip("this interpreter resolves mpiexec elsewhere")
    assert proc.returncode == 2


def test_gpu_device_without_a_gpu_is_a_clear_error(hpcattn_cmd, mpiexec):
    from hpcattn.gpu.environment import no_gpu_reason

    if no_gpu_reason() is None:
        pytest.skip("this machine has a usable GPU")
    proc = run(hpcattn_cmd + ["run", "--np", "2", "-N", "256", "--device", "gpu"])
    assert proc.returncode == 2
    assert "device 'gpu' needs a CUDA GPU and CuPy (pip install 'hpcattn[gpu]'), but rank 0 has none" in proc.stderr
