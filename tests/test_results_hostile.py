"""The results writer against a hostile but fair user: planted symlinks, --force on files that are
not ours, symlinked outputs, corrupted shards and masters, merges into a running job, a full
disk, and the per-case cost of a long sweep. Each test names the class of defect it guards."""
import os

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from hpcattn import results, runner
from hpcattn.errors import HpcattnError
from hpcattn.jobs import load_job
from hpcattn.results import Master, ResultsError

from jobfiles import TINY, write_job

COMM = MPI.COMM_SELF


def tiny_job(tmp_path, out, n=2, activations=True, name="t", **sweep):
    path = write_job(tmp_path / f"{name}.toml", name=name, output=out, activations=activations,
                     sweep={"seq_len": [16 + 8 * i for i in range(n)], **TINY, **sweep})
    return load_job(path)


def one_line_error(exc_info, *words):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


# --- files outside the results: symlinks ---------------------------------------------------------

def test_planted_lock_symlink_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "r.h5"
    os.mkdir(f"{out}.d")
    os.symlink(victim, f"{out}.d/.lock")
    with pytest.raises(HpcattnError) as info:
        runner.run_job(tiny_job(tmp_path, out), COMM)
    one_line_error(info, ".lock is a symlink")
    assert victim.read_text() == "precious"


def test_planted_tmp_names_are_never_written(tmp_path):
    """Temporaries are unique per writer: a planted `<path>.tmp` (link or file) is left alone."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "r.h5"
    os.symlink(victim, f"{out}.tmp")
    (tmp_path / "other.h5.tmp").write_text("someone's")
    job = tiny_job(tmp_path, out)
    runner.run_job(job, COMM)
    os.makedirs(f"{out}.d/case_0000", exist_ok=True)
    os.symlink(victim, f"{out}.d/case_0000/r0.h5.tmp")
    runner.run_job(job, COMM, force=True)
    assert victim.read_text() == "precious" and os.path.islink(f"{out}.tmp")
    assert len(results.completed(out)) == 2


def test_symlinked_sidecar_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "case_0000").mkdir(parents=True)
    (elsewhere / "case_0000" / "r0.h5").write_text("not yours")
    (elsewhere / "notes.txt").write_text("mine")
    out = tmp_path / "r.h5"
    os.symlink(elsewhere, f"{out}.d")
    for force in (False, True):
        with pytest.raises(HpcattnError) as info:
            runner.run_job(tiny_job(tmp_path, out), COMM, force=force)
        one_line_error(info, "r.h5.d is a symlink")
    assert (elsewhere / "case_0000" / "r0.h5").read_text() == "not yours"
    assert (elsewhere / "notes.txt").read_text() == "mine" and not out.exists()


def test_symlinked_case_folder_is_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "r0.h5").write_text("not yours")
    out = tmp_path / "r.h5"
    os.mkdir(f"{out}.d")
    os.symlink(elsewhere, f"{out}.d/case_0000")
    runner.run_job(tiny_job(tmp_path, out), COMM)
    assert (elsewhere / "r0.h5").read_text() == "not yours"
    assert not os.path.islink(f"{out}.d/case_0000") and len(results.completed(out)) == 2
    assert results.verify(out) == []


# --- files outside the results: --force ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["text", "foreign_hdf5", "job_file"])
def test_force_replaces_only_results_files(tmp_path, kind):
    out = tmp_path / "mydata.h5"
    if kind == "text":
        out.write_text("my thesis")
    elif kind == "foreign_hdf5":
        with h5py.File(out, "w") as f:
            f["data"] = np.arange(3)
    job = tiny_job(tmp_path, out)
    if kind == "job_file":
        out = job.path
    before = open(out, "rb").read()
    with pytest.raises(HpcattnError) as info:
        runner.run_job(job, COMM, output=str(out), force=True)
    one_line_error(info, "is not an hpcattn results file" if kind != "job_file" else "is the job file")
    assert open(out, "rb").read() == before


def test_force_keeps_foreign_files_in_the_sidecar(tmp_path):
    out = tmp_path / "mydata.h5"
    job = tiny_job(tmp_path, out)
    runner.run_job(job, COMM)
    (tmp_path / "mydata.h5.d" / "important.txt").write_text("keep me")
    (tmp_path / "mydata.h5.d" / "case_0000" / "notes.txt").write_text("and me")
    assert runner.run_job(job, COMM, force=True)["ran"] == 2
    assert (tmp_path / "mydata.h5.d" / "important.txt").read_text() == "keep me"
    assert (tmp_path / "mydata.h5.d" / "case_0000" / "notes.txt").read_text() == "and me"
    assert results.verify(out) == []


# --- files outside the results: an output that is a symlink --------------------------------------

def test_output_symlink_writes_through_and_locks_the_target(tmp_path):
    real = tmp_path / "data" / "real.h5"
    real.parent.mkdir()
    job = tiny_job(tmp_path, real)
    runner.run_job(job, COMM, output=str(real))
    alias = tmp_path / "alias.h5"
    os.symlink(real, alias)
    held = Master(str(alias))
    held.lock()
    with pytest.raises(HpcattnError) as info:
        runner.run_job(job, COMM, output=str(real), force=True)
    one_line_error(info, "lock held")
    held.unlock()
    s = runner.run_job(tiny_job(tmp_path, real, n=3), COMM, output=str(alias))
    assert (s["ran"], s["skipped"]) == (1, 2)
    assert os.path.islink(alias) and os.path.realpath(alias) == str(real)
    assert len(results.completed(real)) == 3 and not os.path.exists(f"{alias}.d")
    with results.open_results(alias) as f:           # activations resolve next to the target
        assert not np.isnan(f["cases/case_0002/activations/q"][()]).any()


def test_dangling_output_symlink_is_refused(tmp_path):
    alias = tmp_path / "alias.h5"
    os.symlink(tmp_path / "nowhere" / "x.h5", alias)
    with pytest.raises(HpcattnError) as info:
        runner.run_job(tiny_job(tmp_path, alias), COMM)
    one_line_error(info, "is a symlink to", "not a file")
    assert not os.path.exists(tmp_path / "nowhere")


# --- merge and a running job ---------------------------------------------------------------------

def test_merge_takes_the_run_lock(tmp_path):
    part = tmp_path / "p.h5"
    job = tiny_job(tmp_path, part)
    runner.run_job(job, COMM)
    out = tmp_path / "out.h5"
    running = Master(str(out))
    running.lock()                              # a run writing OUT
    with pytest.raises(ResultsError) as info:
        results.merge(str(out), [str(part)])
    one_line_error(info, "lock held")
    running.unlock()
    assert results.merge(str(out), [str(part)])["cases"] == 2
