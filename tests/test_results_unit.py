"""HDF5 results: stitched activations in global order for every layout, a master that is
always whole, clear one-line errors for files that are not ours, merging parts."""
import os
import re
import shutil
import subprocess

import h5py
import numpy as np
import pytest

from hpcattn import results
from hpcattn.errors import HpcattnError
from hpcattn.layouts import LAYOUTS, positions
from hpcattn.results import Master, ResultsError


class SerialComm:
    """Plays rank ``rank`` of ``size`` for write_activations, whose only collectives are a
    barrier and an allgather of error strings (ranks are called one after another)."""

    def __init__(self, size, rank):
        self.size, self.rank = size, rank

    def Barrier(self):
        pass

    def allgather(self, x):
        return [x] * self.size


def hash_fill(b, pos, h, d):
    bb, nn, hh, dd = np.meshgrid(np.arange(b), pos, np.arange(h), np.arange(d), indexing="ij")
    return (((bb * 100_003 + nn) * 101 + hh) * 31 + dd).astype(np.float64)


def new_master(path, name="t"):
    m = Master(str(path))
    m.prepare({"job_name": name, "n_cases": 3}, results.provenance())
    return m


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_stitched_activations_are_global_order(tmp_path, layout, size):
    n, b, h, d = 23, 2, 3, 4
    path = str(tmp_path / "r.h5")
    m = new_master(path)
    spec = None
    for rank in range(size):
        pos = positions(n, size, rank, layout)
        x = hash_fill(b, pos, h, d)
        lse = x[..., 0].transpose(0, 2, 1).copy()          # (b, h, n_local)
        spec = results.write_activations(path, 7, {"q": x, "out": -x, "lse": lse, "positions": pos},
                                         n=n, layout=layout, comm=SerialComm(size, rank),
                                         compression="gzip")
    m.add_cases([{"index": 7, "kind": "attention", "params": {"seq_len": n}, "results": {"x": 1.0},
                  "activations": spec}])
    want = hash_fill(b, np.arange(n), h, d)
    with h5py.File(path) as f:
        act = f["cases/case_0007/activations"]
        np.testing.assert_array_equal(act["q"][()], want)
        np.testing.assert_array_equal(act["out"][()], -want)
        np.testing.assert_array_equal(act["lse"][()], want[..., 0].transpose(0, 2, 1))
        assert act["q"].is_virtual
    assert results.missing_sources(path, h5py.File(path)["cases/case_0007"]) == []


def test_master_round_trip_and_completed(tmp_path):
    path = tmp_path / "m.h5"
    m = new_master(path)
    res = {"wall_s": [0.1, 0.2], "gflops": 3.0, "ok": True, "note": "text", "sub": {"a": [1, 2]}}
    m.add_cases([{"index": 0, "kind": "attention", "params": {"seq_len": 8, "layout": "zigzag"},
                  "results": res, "elapsed_s": 0.5}])
    m.add_cases([{"index": 2, "kind": "mixer", "params": {"mixer": "fnet"}, "results": {"err": 0.1}}])
    assert results.completed(path) == {0: results.params_json({"seq_len": 8, "layout": "zigzag"}),
                                       2: results.params_json({"mixer": "fnet"})}
    with results.open_results(path) as f:
        g = f["cases/case_0000"]
        assert g.attrs["param_layout"] == "zigzag" and g.attrs["kind"] == "attention"
        tree = results.read_tree(g)
        assert list(tree["wall_s"]) == [0.1, 0.2] and tree["ok"] and tree["note"] == "text"
        assert list(tree["sub"]["a"]) == [1, 2] and tree["elapsed_s"] == 0.5
        assert f.attrs["job_name"] == "t" and f.attrs["hpcattn_format"] == results.FORMAT
        assert f.attrs["numpy_version"] == np.__version__ and len(f.attrs["hosts"]) == 1
        assert list(f["runs"]) == ["run_0000"]


def test_reopen_records_a_new_run_and_keeps_cases(tmp_path):
    path = tmp_path / "m.h5"
    new_master(path).add_cases([{"index": 1, "kind": "a", "params": {}, "results": {}}])
    done = Master(str(path)).prepare({"job_name": "t"}, results.provenance())
    assert list(done) == [1]
    with results.open_results(path) as f:
        assert list(f["runs"]) == ["run_0000", "run_0001"]
    with pytest.raises(ResultsError, match="holds results of job 't', not 'other'"):
        Master(str(path)).prepare({"job_name": "other"}, results.provenance())
    assert Master(str(path)).prepare({"job_name": "other"}, results.provenance(), force=True) == {}


def test_failed_update_leaves_master_untouched(tmp_path):
    """What a kill in the middle of an update leaves behind: the old master, whole."""
    path = tmp_path / "m.h5"
    m = new_master(path)
    m.add_cases([{"index": 0, "kind": "a", "params": {}, "results": {"x": 1}}])
    before = open(path, "rb").read()

    def half_written(f):
        f["cases"].create_group("case_0001").attrs["index"] = 1
        raise KeyboardInterrupt  # stands in for a signal in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        m._update(half_written)
    assert open(path, "rb").read() == before
    assert list(results.completed(path)) == [0]


def test_non_numeric_result_is_refused(tmp_path):
    m = new_master(tmp_path / "m.h5")
    with pytest.raises(HpcattnError, match="result 'obj' of type object cannot be stored"):
        m.add_cases([{"index": 0, "kind": "a", "params": {}, "results": {"obj": object()}}])
    assert results.completed(tmp_path / "m.h5") == {}


# --- files that are not usable ---------------------------------------------------------------

def corrupt_files(tmp_path):
    good = tmp_path / "good.h5"
    new_master(good).add_cases([{"index": 0, "kind": "a", "params": {}, "results": {"x": 1}}])
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 3])
    noise = tmp_path / "noise.h5"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.arange(3)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    return {"truncated": truncated, "noise": noise, "foreign": foreign, "empty": empty}


CORRUPT_MESSAGES = {"truncated": "is not a readable HDF5 file (truncated or corrupt?)",
                    "noise": "is not a readable HDF5 file (truncated or corrupt?)",
                    "empty": "is not a readable HDF5 file (truncated or corrupt?)",
                    "foreign": "is an HDF5 file but not an hpcattn results file"}


@pytest.mark.parametrize("kind", sorted(CORRUPT_MESSAGES))
def test_unusable_files_get_one_line_errors(tmp_path, kind):
    path = corrupt_files(tmp_path)[kind]
    with pytest.raises(ResultsError) as info:
        results.open_results(path)
    msg = str(info.value)
    assert CORRUPT_MESSAGES[kind] in msg and str(path) in msg and "\n" not in msg
    with pytest.raises(ResultsError, match="not"):   # resuming onto it fails the same way
        Master(str(path)).prepare({"job_name": "t"}, results.provenance())
    with pytest.raises(ResultsError, match="does not exist"):
        results.open_results(tmp_path / "absent.h5")


def test_newer_format_is_refused(tmp_path):
    path = tmp_path / "m.h5"
    new_master(path)
    with h5py.File(path, "a") as f:
        f.attrs["hpcattn_format_version"] = results.FORMAT_VERSION + 1
    with pytest.raises(ResultsError, match="format version 2; this hpcattn reads up to 1"):
        results.open_results(path)


# --- merging ---------------------------------------------------------------------------------

def part_with_activations(path, indices, name="t", value=0.0):
    m = new_master(path, name)
    for i in indices:
        x = np.full((1, 4, 1, 2), value + i)
        spec = results.write_activations(str(path), i, {"q": x}, n=4, layout="contiguous",
                                         comm=SerialComm(1, 0))
        m.add_cases([{"index": i, "kind": "a", "params": {"i": i}, "results": {"x": float(i)},
                      "activations": spec}])


def test_merge_parts_into_one_standalone_file(tmp_path):
    part_with_activations(tmp_path / "p0.h5", [0, 2])
    part_with_activations(tmp_path / "p1.h5", [1])
    out = tmp_path / "out" / "all.h5"
    os.makedirs(out.parent)
    s = results.merge(str(out), [str(tmp_path / "p0.h5"), str(tmp_path / "p1.h5")])
    assert (s["cases"], s["parts"], s["missing"]) == (3, 2, [])
    shutil.rmtree(tmp_path / "p0.h5.d")          # out must not depend on the parts any more
    os.remove(tmp_path / "p0.h5")
    with results.open_results(out) as f:
        assert sorted(f["cases"]) == ["case_0000", "case_0001", "case_0002"]
        for i in range(3):
            assert f[f"cases/case_000{i}/activations/q"][()].ravel().tolist() == [float(i)] * 8
        assert len(f["runs"]) == 2 and len(f.attrs["merged_from"]) == 2
    # merging again with OUT existing keeps what it has and adds nothing twice
    s = results.merge(str(out), [str(tmp_path / "p1.h5")])
    assert s["cases"] == 3 and s["parts"] == 2


def test_merge_reports_missing_cases_and_refuses_other_jobs(tmp_path):
    part_with_activations(tmp_path / "p0.h5", [0])
    assert results.merge(str(tmp_path / "o.h5"), [str(tmp_path / "p0.h5")])["missing"] == [1, 2]
    part_with_activations(tmp_path / "x.h5", [1], name="other")
    with pytest.raises(ResultsError, match="holds job 'other' but .* holds 't'"):
        results.merge(str(tmp_path / "o2.h5"), [str(tmp_path / "p0.h5"), str(tmp_path / "x.h5")])
    paths = corrupt_files(tmp_path)
    with pytest.raises(ResultsError, match="not a readable HDF5 file"):
        results.merge(str(tmp_path / "o3.h5"), [str(tmp_path / "p0.h5"), str(paths["truncated"])])
    assert not os.path.exists(tmp_path / "o2.h5") and not os.path.exists(tmp_path / "o3.h5")


def test_merge_refuses_missing_activation_files(tmp_path):
    part_with_activations(tmp_path / "p0.h5", [0])
    shutil.rmtree(tmp_path / "p0.h5.d" / "case_0000")
    with pytest.raises(ResultsError, match="refers to missing activation file"):
        results.merge(str(tmp_path / "o.h5"), [str(tmp_path / "p0.h5")])


def test_lock_keeps_a_second_writer_out(tmp_path):
    a = Master(str(tmp_path / "m.h5"))
    a.lock()
    with pytest.raises(ResultsError, match="another hpcattn run is writing"):
        Master(str(tmp_path / "m.h5")).lock()
    a.unlock()
    Master(str(tmp_path / "m.h5")).lock()


@pytest.mark.timeout(60)
def test_h5dump_reads_master_and_stitched_data(tmp_path):
    """A reader nobody here wrote (Debian hdf5-tools) sees the stitched array."""
    h5dump = shutil.which("h5dump")
    if h5dump is None:
        pytest.skip("h5dump not installed (apt-get install hdf5-tools)")
    path = tmp_path / "m.h5"
    m = new_master(path)
    spec = None
    for rank in range(2):
        pos = positions(6, 2, rank, "striped")
        spec = results.write_activations(str(path), 0, {"q": pos.reshape(1, -1, 1, 1).astype(np.float32)},
                                         n=6, layout="striped", comm=SerialComm(2, rank))
    m.add_cases([{"index": 0, "kind": "a", "params": {"n": 6}, "results": {"x": 1}, "activations": spec}])
    header = subprocess.run([h5dump, "-H", str(path)], capture_output=True, text=True, timeout=30)
    assert header.returncode == 0, header.stderr
    assert 'DATASET "q"' in header.stdout and 'ATTRIBUTE "job_name"' in header.stdout
    data = subprocess.run([h5dump, "-d", "/cases/case_0000/activations/q", str(path)],
                          capture_output=True, text=True, timeout=30, cwd="/")
    assert data.returncode == 0, data.stderr
    assert re.findall(r"\): (-?[\d.]+)", data.stdout) == ["0", "1", "2", "3", "4", "5"]


def test_mpio_detection_says_whether_the_mpio_driver_works(tmp_path):
    """The collective writer is chosen by have_mpio(): it must be True exactly when a file can be
    written and read back through the mpio driver (serial h5py refuses that driver)."""
    from mpi4py import MPI

    path = str(tmp_path / "p.h5")
    try:
        with h5py.File(path, "w", driver="mpio", comm=MPI.COMM_SELF) as f:
            f["x"] = np.arange(3)
        with h5py.File(path, "r") as f:
            works = list(f["x"][()]) == [0, 1, 2]
    except ValueError as exc:
        assert "without MPI support" in str(exc)
        works = False
    assert results.have_mpio() is works


def test_provenance_names_the_slurm_job(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.delenv("SLURM_CLUSTER_NAME", raising=False)
    info = results.provenance()
    assert info["slurm_job_id"] == "4242" and info["slurm_array_task_id"] == "7"
    assert "slurm_cluster_name" not in info
