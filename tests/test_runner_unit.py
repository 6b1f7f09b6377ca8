"""The job runner on one rank, in-process: resume, --force, array selection, stop signals,
mixer cases through a stand-in mixer module, progress bar, and the CLI around it."""
import io
import json
import os
import signal
import types

import pytest
from click.testing import CliRunner
from mpi4py import MPI

from hpcattn import results, runner
from hpcattn.cli.run import run as run_cmd
from hpcattn.errors import CollectiveError
from hpcattn.launch import under_mpi
from hpcattn.jobs import JobFileError, load_job

from jobfiles import TINY, assert_same_results, comparable, write_job

COMM = MPI.COMM_SELF


@pytest.fixture
def job(tmp_path):
    path = write_job(tmp_path / "job.toml", sweep={"seq_len": [16, 32, 48], "causal": [False, True], **TINY},
                     output=tmp_path / "res.h5", activations=True)
    return load_job(path)


def test_run_then_rerun_skips_everything(job):
    s = runner.run_job(job, COMM)
    assert (s["total"], s["selected"], s["ran"], s["skipped"], s["failed_checks"], s["stopped"]) == \
        (6, 6, 6, 0, [], 0)
    first = comparable(job.output)
    assert len(results.completed(job.output)) == 6
    assert first["case_0003/check_passed"] and first["case_0003/activations/out"].shape == (1, 32, 2, 8)
    s = runner.run_job(job, COMM)
    assert (s["ran"], s["skipped"]) == (0, 6)
    assert_same_results(comparable(job.output), first)


def test_force_recomputes(job):
    runner.run_job(job, COMM)
    s = runner.run_job(job, COMM, force=True)
    assert (s["ran"], s["skipped"]) == (6, 0)
    with results.open_results(job.output) as f:
        assert len(f["runs"]) == 1  # a fresh file


def test_incomplete_cases_are_redone(job, monkeypatch):
    """Stop after two cases (as a signal would), then resume: same file as one uninterrupted run."""
    calls = []
    real = runner.StopFlag.agreed

    def stop_after_two(self, comm):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGUSR1)   # a real signal through the real handler
        return real(self, comm)

    monkeypatch.setattr(runner.StopFlag, "agreed", stop_after_two)
    s = runner.run_job(job, COMM)
    assert (s["ran"], s["stopped"]) == (2, signal.SIGUSR1)
    assert sorted(results.completed(job.output)) == [0, 1]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGUSR1))
    monkeypatch.setattr(runner.StopFlag, "agreed", real)
    s = runner.run_job(job, COMM)
    assert (s["ran"], s["skipped"], s["stopped"]) == (4, 2, 0)
    resumed = comparable(job.output)
    runner.run_job(job, COMM, output=job.output + ".ref.h5")
    assert_same_results(resumed, comparable(job.output + ".ref.h5"))


def test_handlers_are_restored(job):
    before = {sig: signal.getsignal(sig) for sig in runner.STOP_SIGNALS}
    runner.run_job(job, COMM)
    assert {sig: signal.getsignal(sig) for sig in runner.STOP_SIGNALS} == before


def test_changed_parameters_refuse_to_resume(job):
    runner.run_job(job, COMM)
    other = job.with_overrides({"heads": 4})
    with pytest.raises(CollectiveError, match=r"case_0000 was computed with other parameters \(heads=2, now 4; kv_heads=2, now 4\)"):
        runner.run_job(other, COMM)
    assert runner.run_job(other, COMM, force=True)["ran"] == 6


def test_array_tasks_partition_the_cases(job, tmp_path):
    parts = []
    for task in range(4):
        s = runner.run_job(job, COMM, array_task=task, array_tasks=4)
        assert s["path"] == str(tmp_path / f"res.task{task}.h5")
        assert sorted(results.completed(s["path"])) == [c for c in range(6) if c % 4 == task]
        parts.append(s["path"])
    merged = str(tmp_path / "merged.h5")
    assert results.merge(merged, parts)["missing"] == []
    runner.run_job(job, COMM)
    assert_same_results(comparable(merged), comparable(job.output))
    # the merged file is resumable like any other: nothing left to do
    assert runner.run_job(job, COMM, output=merged)["skipped"] == 6


def test_invalid_case_is_reported_before_anything_runs(tmp_path):
    path = write_job(tmp_path / "bad.toml", sweep={"seq_len": [16, 32], "heads": 3, "kv_heads": [3, 2],
                                                   "head_dim": 4}, output=tmp_path / "bad.h5")
    with pytest.raises(CollectiveError, match=r"case 1 \(seq_len=16 kv_heads=2\): kv_heads=2 does not divide"):
        runner.run_job(load_job(path), COMM)
    assert not os.path.exists(tmp_path / "bad.h5")


def test_output_path_and_select():
    job = types.SimpleNamespace(output="results/x.h5")
    assert runner.output_path(job, None, None, None) == "results/x.h5"
    assert runner.output_path(job, "y.h5", 1, 3) == "y.h5"
    assert runner.output_path(job, None, 2, 3) == "results/x.task2.h5"
    assert runner.select(7, 1, 3) == [1, 4]
    assert runner.select(3, None, None) == [0, 1, 2]


def test_progress_bar_only_when_enabled():
    buf = io.StringIO()
    bar = runner.Progress(4, 1, True, stream=buf)
    bar.show()
    bar.step(label="case_0001 seq_len=32")
    bar.close()
    text = buf.getvalue()
    assert "1/4 cases" in text and "2/4 cases" in text and "ETA" in text and "seq_len=32" in text
    assert text.endswith("\n")
    quiet = io.StringIO()
    bar = runner.Progress(4, 0, False, stream=quiet)
    bar.show()
    bar.step()
    bar.close()
    assert quiet.getvalue() == ""


# --- mixer cases, with a stand-in for hpcattn.mixers.cases --------------------------------------

@pytest.fixture
def fake_mixers(monkeypatch):
    import hpcattn.jobs as jobs

    seen = []

    def run_mixer_case(case):
        seen.append(case["mixer"])
        if case["mixer"] == "broken":
            raise RuntimeError("out of budget")
        return {"wall_s": [0.01], "rel_err": 0.1 * case["seq_len"], "peak_alloc_bytes": [1024]}

    module = types.SimpleNamespace(run_mixer_case=run_mixer_case)
    monkeypatch.setattr(runner, "_mixer_cases", lambda: module)
    monkeypatch.setattr(jobs, "mixer_keys", lambda: {"mixer": jobs.Spec(str), "seq_len": jobs.POSITIVE})
    return seen


def test_mixer_cases_run_and_resume(tmp_path, fake_mixers):
    path = write_job(tmp_path / "m.toml", kind="mixer", sweep={"mixer": ["fnet", "local"], "seq_len": [8, 16]},
                     output=tmp_path / "m.h5")
    job = load_job(path)
    s = runner.run_job(job, COMM)
    assert s["ran"] == 4 and fake_mixers == ["fnet", "fnet", "local", "local"]
    with results.open_results(job.output) as f:
        g = f["cases/case_0003"]
        assert g.attrs["kind"] == "mixer" and g.attrs["param_mixer"] == "local"
        assert g["rel_err"][()] == pytest.approx(1.6)
    assert runner.run_job(job, COMM)["skipped"] == 4 and len(fake_mixers) == 4


def test_failing_mixer_case_keeps_the_others(tmp_path, fake_mixers):
    path = write_job(tmp_path / "m.toml", kind="mixer", sweep={"mixer": ["fnet", "broken"], "seq_len": 8},
                     output=tmp_path / "m.h5")
    with pytest.raises(CollectiveError, match=r"case_0001 \(mixer=broken\) failed: RuntimeError: out of budget"):
        runner.run_job(load_job(path), COMM)
    assert list(results.completed(tmp_path / "m.h5")) == [0]


# --- the command line ----------------------------------------------------------------------------

def invoke(args):
    return CliRunner().invoke(run_cmd, args, catch_exceptions=False)


def test_cli_runs_job_with_overrides(tmp_path, job):
    out = str(tmp_path / "cli.h5")
    res = invoke([job.path, "--output", out, "--seq-len", "24", "--no-causal", "--check"])
    assert res.exit_code == 0, res.output
    assert "job t: 1/1 cases complete" in res.output and f"hpcattn analyze {out}" in res.output
    (params,) = [json.loads(p) for p in results.completed(out).values()]
    assert (params["seq_len"], params["causal"], params["check_rows"]) == (24, False, 64)


def test_cli_job_errors_are_one_line(tmp_path):
    bad = write_job(tmp_path / "bad.toml", sweep={"seq_len": 16, "layuot": "zigzag"})
    res = CliRunner().invoke(run_cmd, [bad])
    assert res.exit_code == 2
    assert "bad.toml:7: sweep.layuot is not a known key" in res.output
    res = CliRunner().invoke(run_cmd, [str(tmp_path / "absent.toml")])
    assert res.exit_code == 2 and "does not exist" in res.output
    if not under_mpi():   # with --np the job is checked before mpiexec starts
        res = CliRunner().invoke(run_cmd, ["--np", "2", bad])
        assert res.exit_code == 2 and "hpcattn: error: " in res.output and "sweep.layuot" in res.output


@pytest.mark.parametrize("args, message", [
    (["--output", "x.h5"], "--output needs a job file"),
    (["--force"], "--force needs a job file"),
    (["JOB", "--array-task", "1"], "is not a valid pair"),
    (["JOB", "--array-task", "3", "--array-tasks", "3"], "is not a valid pair"),
])
def test_cli_usage_errors(job, args, message):
    res = CliRunner().invoke(run_cmd, [job.path if a == "JOB" else a for a in args])
    assert res.exit_code == 2 and message in res.output


@pytest.mark.parametrize("kind", ["truncated", "foreign"])
def test_cli_resume_onto_corrupt_file(tmp_path, job, kind):
    out = tmp_path / "res.h5"
    if kind == "truncated":
        runner.run_job(job, COMM)
        data = out.read_bytes()
        out.write_bytes(data[: len(data) // 2])
        want = "is not a readable HDF5 file (truncated or corrupt?)"
    else:
        import h5py

        with h5py.File(out, "w") as f:
            f["x"] = 1
        want = "is an HDF5 file but not an hpcattn results file"
    res = CliRunner().invoke(run_cmd, [job.path])
    assert res.exit_code == 2 and want in res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1
    before = out.read_bytes()
    res = CliRunner().invoke(run_cmd, [job.path, "--force"])
    if kind == "truncated":   # a damaged file hpcattn wrote: --force is the way out
        assert res.exit_code == 0, res.output
    else:                     # someone else's HDF5 file: --force refuses to replace it
        assert res.exit_code == 2 and "is not an hpcattn results file" in res.output
        assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1
        assert out.read_bytes() == before


def test_real_mixer_cases_through_the_runner(tmp_path):
    """The mixers package's own contract (MIXER_CASE_KEYS, check_mixer_case, run_mixer_case)."""
    pytest.importorskip("hpcattn.mixers.cases")
    path = write_job(tmp_path / "m.toml", kind="mixer", output=tmp_path / "m.h5",
                     sweep={"task": "error", "mixer": ["exact_blockwise", "fnet"], "seq_len": 32,
                            "head_dim": 8, "repeats": 1})
    assert runner.run_job(load_job(path), COMM)["ran"] == 2
    with results.open_results(tmp_path / "m.h5") as f:
        exact, fnet = (f[f"cases/case_000{i}"] for i in range(2))
        assert exact.attrs["status"] == "ok" and exact["rel_err"][()] < 1e-5 < fnet["rel_err"][()]
        assert json.loads(exact.attrs["params_json"])["heads"] == 2   # defaults recorded
    bad = write_job(tmp_path / "b.toml", kind="mixer", sweep={"mixer": ["fnet", "nosuch"], "seq_len": 32})
    with pytest.raises(CollectiveError, match=r"case 1 \(mixer=nosuch\): mixer case mixer='nosuch' is unknown"):
        runner.run_job(load_job(bad), COMM, output=str(tmp_path / "b.h5"))
    typo = write_job(tmp_path / "t.toml", kind="mixer", sweep={"mixer": "fnet", "windw": 3})
    with pytest.raises(JobFileError, match=r"t\.toml:7: sweep\.windw is not a known key"):
        load_job(typo)


def test_backward_job_stores_gradients_equal_to_the_reference(tmp_path):
    """backward = true in a sweep: every strategy's gradients are stored (global order) and equal
    the float64 analytic backward of the stored q, k, v and dout; the check covers them."""
    import numpy as np

    from hpcattn.reference import naive_attention_backward

    path = write_job(tmp_path / "job.toml", sweep={"seq_len": 37, "causal": True, "backward": True,
                                                   "strategy": ["ring", "ulysses"], **TINY},
                     output=tmp_path / "bw.h5", activations=True)
    job = load_job(path)
    s = runner.run_job(job, COMM)
    assert (s["ran"], s["failed_checks"]) == (2, [])
    with results.open_results(job.output) as f:
        for name in ("case_0000", "case_0001"):
            act = {k: f[f"cases/{name}/activations/{k}"][()] for k in
                   ("q", "k", "v", "dout", "dq", "dk", "dv")}
            ref = naive_attention_backward(act["q"], act["k"], act["v"], act["dout"], causal=True)
            for g, r in zip(("dq", "dk", "dv"), ref):
                assert np.abs(act[g] - r).max() < 1e-12, (name, g)
            assert f[f"cases/{name}/max_dk_err"][()] < 1e-12
